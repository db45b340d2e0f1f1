"""An OpenAI-compatible fake upstream: deterministic replies, scripted tool calls, injected faults, stats.

Run it with ``tokenmill simulate`` / ``python -m simulator``, or from tests with
``simulator.testing.SimulatorServer`` (the ``simulator`` pytest fixture yields one, reset per test).

Endpoints: ``POST /v1/chat/completions`` (stream or not), ``GET /v1/models``, ``GET /v1/models/{id}``;
controls ``GET|POST /_sim/config``, ``GET /_sim/stats``, ``POST /_sim/reset`` (stats zeroed *and* config
back to the start values), ``GET /_sim/health``.

Replies
    Content is derived from a hash of (model, messages, tools, tool_choice, response_format,
    parallel_tool_calls, seed): the same request gets the same answer, another model another answer.
    Tokens: about ``len(text) / 4``, at least 1; prompt tokens add 4 per message and 3 for priming.
    ``max_tokens``/``max_completion_tokens`` below the reply's size truncate it (``finish_reason
    "length"``); ``stop`` cuts at the first stop string. ``response_format`` ``json_schema`` replies
    with a JSON instance that validates against the schema; ``json_object`` with ``{"reply": text}``.
    Response ids are unique per call; tool-call ids are deterministic.

Directives, read from the last user message only (``[[...]]`` with another word is plain text)
    ``[[call NAME {json args}]]``   ask for a tool call; several in a row are parallel calls of one turn;
                                    ``{json args}`` is optional (then generated from the tool's schema).
    ``[[then]]``                    separates turns: ``[[call a {}]] [[then]] [[call b {}]]`` calls ``a``,
                                    then, once its result is in, ``b``, then replies with text.
                                    Calls are made only if tools are offered and ``tool_choice`` is not
                                    "none"; the turn is chosen by counting assistant tool-call messages
                                    after the last user message. ``parallel_tool_calls: false`` makes every
                                    call its own turn.
    (tool results)                  once the scripted turns are done, a reply after tool messages reads
                                    ``tool results: NAME=CONTENT; NAME=CONTENT`` (the results after the
                                    last user message, in order).
    ``tool_choice``                 with no ``[[call]]``: "required" calls the first tool, a named function
                                    (or custom tool) calls that one, ``allowed_tools`` in mode "required"
                                    the first allowed one, each with arguments generated from its schema,
                                    once.
    (custom tools)                  a free-form tool (``{"type": "custom", "custom": {"name": ...}}``) is
                                    called as OpenAI calls one: ``custom: {name, input}``, the input the
                                    ``[[call]]``'s JSON text, else generated words.
    ``[[recall]]``                  the reply includes ``recall: A | B | ...``: every earlier assistant text
                                    and tool result of the conversation, in order.
    ``[[say TEXT]]``                the reply includes TEXT verbatim (several: one line each).
    ``[[refuse TEXT]]``             the model refuses: ``message.refusal`` is TEXT, content null (streamed
                                    as ``delta.refusal`` pieces), as OpenAI's structured outputs refuse.
    ``[[echo]]``                    the reply includes ``messages: JSON``: the ``messages`` array exactly as
                                    received (keys sorted, no spaces), to check what reached the provider.
    ``[[words N]]``                 a generated reply of N words.
    ``[[status CODE]]``             answer CODE (4xx/5xx) with OpenAI's error body; ``[[status 429
                                    retry_after=2]]`` adds ``Retry-After: 2`` (and ``retry-after-ms``).
    ``[[context_length]]``          400, code ``context_length_exceeded``, as OpenAI does.
    ``[[delay SECONDS]]``           wait before answering (before any fault above, too).
    ``[[break_stream N]]``          a stream sends N events then the connection drops.
    ``[[garbage]]``                 answer 200 with a body that arrives whole but is no JSON: the reply's
                                    JSON cut in half, as ``application/json`` (a stream: a first event of
                                    such data, then ``[DONE]``). Counted in ``requests``, ``by_model`` and
                                    ``by_status`` ("200"), not in ``accepted`` nor the token sums.
    ``[[garbage shape]]``           as ``[[garbage]]``, but the body (a stream: its first event) is whole
                                    JSON of the wrong shape: the reply whose ``choices[0].message`` (a
                                    stream's ``choices[0].delta``) is its text, a string, not an object.
    ``[[content_parts]]``           the reply's text as a list of content parts, as Mistral and some
                                    OpenAI-compatible servers send it: ``choices[0].message.content``
                                    is ``[{"type": "text", "text": ...}, ...]`` (a stream: each
                                    ``delta.content`` with text is such a list). ``[[content_parts
                                    image]]`` puts an ``image_url`` part after the first text part;
                                    ``[[content_parts bad]]`` makes the last text part's ``text`` a
                                    number (the wrong shape); ``[[content_parts empty]]`` sends
                                    ``content: []`` (no part at all). Counted as any answer.
    ``times=N``                     on status, context_length, delay, break_stream, garbage: the fault
                                    hits only the first N times this same request arrives (``[[status
                                    500 times=2]]`` fails twice, then answers), to script
                                    retry-then-succeed.
    ``[[empty_chunks]]``            this stream interleaves empty chunks.
    ``[[cached N]]``                usage reports N cached prompt tokens (at most the prompt's).
    ``[[reasoning N]]``             usage adds N reasoning tokens to the completion tokens.

Faults and latency (``SimConfig``; flags at start, ``POST /_sim/config`` at runtime)
    One draw per completion from a ``seed``-ed stream: ``rate_429`` (with ``retry_after_s``), then
    ``rate_500``, then ``rate_timeout`` (hang ``timeout_s``, send headers, drop the connection), so the
    fractions hold over many requests. ``rpm_limit`` refuses with 429 beyond N requests a rolling minute.
    ``known_models`` (404 ``model_not_found`` for others), ``require_api_key`` (401 for another Bearer
    key), ``max_context_tokens``, ``latency_ms`` + ``latency_jitter_ms`` + ``latency_per_token_ms``,
    streams: ``stream_chunk_chars``, ``stream_chunk_delay_ms``, ``empty_chunks``, ``break_stream_after``.

Stats (``GET /_sim/stats``)
    requests, completions, streams, accepted (answered in full), by_status (``"timeout"`` for dropped
    ones), by_model, token sums, in_flight and peak_in_flight, broken_streams, timeouts, connections
    (distinct client connections that sent completion requests: how well callers reuse them), the
    arrival times of every completion request and of every accepted one, accepted_per_second.
    ``simulator.testing.peak_rate`` gives the highest rate over any window from them. Keys never appear
    in stats, config answers or logs.

Several processes (``--workers N``)
    share the port and act as one for ``/_sim/*`` (config and reset reach all, stats are merged, see
    ``simulator.peers``); but ``rpm_limit`` and ``times=N`` count per process, and ``peak_in_flight``
    is the sum of the processes' peaks. Each response names its process in ``x-sim-worker``.

Exception tree: see ``simulator.errors``.
"""

from simulator.app import SimulatorApp
from simulator.config import SimConfig
from simulator.errors import ApiError, ConfigError, SimulatorError, SimulatorStartError
from simulator.testing import SimulatorServer, peak_count, peak_rate

__all__ = [
    "ApiError",
    "ConfigError",
    "SimConfig",
    "SimulatorApp",
    "SimulatorError",
    "SimulatorServer",
    "SimulatorStartError",
    "peak_count",
    "peak_rate",
]
