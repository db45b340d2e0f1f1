"""The chat clients' own HTTP transport for ``create``: JSON POSTed over aiohttp, read as bytes.

Through the SDK, each call built a request-options model, an ``httpx2.Request`` (headers merged,
URL joined, the body serialized by the stdlib), wrapped aiohttp's answer in an ``httpx2.Response``
and checked it: 41% of a worker's CPU at zero latency (py-spy, ``bench/throughput.py``). Here the
URL and headers are made once per client, the body is ``orjson.dumps`` of the dict, and the reply
is its bytes, status and headers; ``models.openai.errors`` maps a failed answer or an aiohttp
exception exactly as it maps what the SDK raised for the same event.

What the SDK's aiohttp transport did is kept: the proxy from the environment, chosen for the
client's URL by ``httpx2``'s own rules (``HTTP_PROXY``, ``HTTPS_PROXY``, ``ALL_PROXY`` in either
case, ``NO_PROXY`` with its domain, IP and CIDR forms; ``environment_proxy``), the SDK's trust store
(``httpx2``'s SSL context), its timeout read as connect, pool and per-read limits, its pool size,
redirects followed, and its ``User-Agent``. The SDK's own ``X-Stainless-*`` telemetry headers (OS,
arch, runtime, retry count) are not sent. The session is the client's, one per event loop (an
aiohttp session must not cross loops); cancelling the awaiting task aborts the request. The proxy
for the client's one URL is read from the environment once, when the transport is made, not per
request: aiohttp's ``trust_env`` reads the proxy variables and ``~/.netrc`` on every request, in a
thread (13% of a worker's busy time, py-spy).

Unlike the SDK, the timeout is also the whole exchange's deadline, and an answer is read up to
``MAX_ANSWER_BYTES`` (after its content encoding is undone): an upstream that trickled its headers
or body a byte a second held the call (and the rate limiter's lease, which assumes a call ends
within the timeout) for as long as it liked, and one that sent an endless body, or a gzip bomb,
was read whole into the worker's memory. A 2xx past the bound is ``InvalidProviderResponse`` with
code ``RESPONSE_TOO_LARGE`` (billed: not asked again). A proxy that is
not ``http://`` (an ``https://`` one needs TLS to the proxy, which aiohttp's proxy support does
not give; ``socks5://``) is one this transport cannot carry: ``carries_its_proxy`` is then False
and the client sends through the SDK instead.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from collections.abc import Awaitable, Callable, Mapping

import aiohttp
import httpx2
import openai
from httpx2._utils import URLPattern, get_environment_proxies
from multidict import CIMultiDictProxy
from yarl import URL

from models.errors import InvalidProviderResponse, ModelClientError
from models.openai.errors import from_aiohttp_error, from_status
from models.openai.results import oversized_answer

__all__ = ["MAX_ANSWER_BYTES", "SDK_USER_AGENT", "ChatTransport", "UpstreamStatus", "environment_proxy"]

# What the SDK sent, so that an upstream's logs and allow-lists see the same client.
SDK_USER_AGENT = f"AsyncOpenAI/Python {openai.__version__}"
_POOL_SIZE = 1000  # the SDK's DEFAULT_CONNECTION_LIMITS.max_connections
_KEEPALIVE_SECONDS = 5.0  # httpx2's keepalive_expiry, which the SDK kept
# The most of one answer held in memory, decoded: far above any completion's body (128k tokens
# with top-20 logprobs is under 200 MB only for n > 1; a plain 128k-token answer is under 1 MB).
MAX_ANSWER_BYTES = 64 * 1024 * 1024
_READ_PIECE_BYTES = 256 * 1024

HeaderSource = Callable[[], Awaitable[Mapping[str, str]]]


class UpstreamStatus(Exception):
    """A non-2xx answer, the cause a mapped error is raised from (the SDK's ``APIStatusError``
    was): its status and request id, for tracebacks."""

    def __init__(self, status: int, request_id: str | None) -> None:
        super().__init__(f"the upstream answered {status} (request id {request_id})")
        self.status = status
        self.request_id = request_id


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    """The TLS context of every transport of the process (verifying as httpx2's default does).
    Built per transport it cost each new client ~26 ms of CPU on its event loop (the CA
    certificates loaded and parsed), and a client is built per model name, which tenants choose:
    a batch naming a new model per line cost its worker 20 times a plain call's CPU. A context
    is safe to share between connections, and it reads nothing that changes."""
    return httpx2.create_ssl_context()


class ChatTransport:
    """POSTs JSON bodies to one URL: ``post`` returns the 2xx answer's body and headers, or raises
    a ``ModelClientError`` mapped from the status or the connection failure.

    ``headers`` are sent with every request; ``extra_headers``, if given, is awaited per request
    for those that change (an Azure AD token)."""

    def __init__(
        self,
        url: str,
        headers: Mapping[str, str],
        *,
        timeout: float | None,
        provider: str,
        model: str,
        extra_headers: HeaderSource | None = None,
    ) -> None:
        self._url = URL(url)  # parsed once, not per request
        self.headers = {"Accept": "application/json", "Content-Type": "application/json", **headers}
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=timeout, sock_connect=timeout, sock_read=timeout
        )
        self._deadline_seconds = timeout
        self.max_answer_bytes = MAX_ANSWER_BYTES
        self._provider = provider
        self._model = model
        self._extra_headers = extra_headers
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        proxy = environment_proxy(url)
        self.proxy_url = None if proxy is None else str(proxy.url)
        self.carries_its_proxy = proxy is None or proxy.url.scheme == "http"
        # Credentials in the proxy's URL, sent as aiohttp's deprecated BasicAuth sent them: on the
        # request itself to a plain-http URL (the proxy reads it), on the CONNECT to an https one.
        self._proxy_headers: dict[str, str] | None = None
        if proxy is not None and proxy.auth is not None:
            authorization = {"Proxy-Authorization": aiohttp.encode_basic_auth(*proxy.auth)}
            if self._url.scheme == "http":
                self.headers.update(authorization)
            else:
                self._proxy_headers = authorization

    def _session_for_loop(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is None or self._loop is not loop or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=_POOL_SIZE,
                keepalive_timeout=_KEEPALIVE_SECONDS,
                ssl=_ssl_context(),
            )
            self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
            self._loop = loop
        return self._session

    async def post(self, body: bytes) -> tuple[bytes, CIMultiDictProxy[str]]:
        session = self._session_for_loop()
        headers = self.headers
        if self._extra_headers is not None:
            headers = {**headers, **await self._extra_headers()}
        try:
            async with (
                asyncio.timeout(self._deadline_seconds),
                session.post(
                    self._url,
                    data=body,
                    headers=headers,
                    proxy=self.proxy_url,
                    proxy_headers=self._proxy_headers,
                ) as response,
            ):
                status = response.status
                answer_headers = response.headers
                content = await self._read_bounded(response)
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            raise from_aiohttp_error(e, provider=self._provider, model=self._model) from e
        if not 200 <= status < 300:
            error: ModelClientError = from_status(
                status, answer_headers, content, provider=self._provider, model=self._model
            )
            raise error from UpstreamStatus(status, error.request_id)
        return content, answer_headers

    async def _read_bounded(self, response: aiohttp.ClientResponse) -> bytes:
        """The answer's decoded body, read a piece at a time. Past ``max_answer_bytes`` the
        connection is dropped (what is left is never read): a 2xx raises
        ``InvalidProviderResponse``, an error status keeps the bound's worth to be mapped."""
        limit = self.max_answer_bytes
        answered = 200 <= response.status < 300
        if answered and response.content_length is not None and response.content_length > limit:
            raise self._too_large(response)
        if answered and response.content_length is not None and "Content-Encoding" not in response.headers:
            return await response.read()  # the usual answer: its length said, and within the bound
        content = bytearray()
        async for piece in response.content.iter_chunked(_READ_PIECE_BYTES):
            content += piece
            if len(content) > limit:
                if answered:
                    raise self._too_large(response)
                response.close()
                del content[limit:]
                break
        return bytes(content)

    def _too_large(self, response: aiohttp.ClientResponse) -> InvalidProviderResponse:
        response.close()  # what is left of the body is never read
        oversized = oversized_answer(self.max_answer_bytes)
        return InvalidProviderResponse(
            oversized.message,
            provider=self._provider,
            model=self._model,
            request_id=response.headers.get("x-request-id"),
            code=oversized.code,
        )

    async def close(self) -> None:
        """Close this loop's session (one made on another loop cannot be closed from here; its
        loop is gone or not ours)."""
        session, self._session = self._session, None
        loop, self._loop = self._loop, None
        if session is not None and loop is asyncio.get_running_loop():
            await session.close()


def environment_proxy(url: str) -> httpx2.Proxy | None:
    """The proxy the environment names for ``url``, chosen as ``httpx2.AsyncClient`` (the SDK's
    client) chooses it: its own reading of the variables (``get_environment_proxies``) and its
    mount patterns, the most specific matching pattern first; None for no proxy or a
    ``NO_PROXY`` exemption."""
    target = httpx2.URL(url)
    mounts = {URLPattern(pattern): proxy for pattern, proxy in get_environment_proxies().items()}
    for pattern in sorted(mounts):
        if pattern.matches(target):
            proxy = mounts[pattern]
            return None if proxy is None else httpx2.Proxy(url=proxy)
    return None
