"""The client's side of the private fit over HTTP: upload Enc(Ẑ_A), get the decrypted cross products back.

    with PrivateFitClient("http://provider:8000") as fits:
        texts = fits.public_texts()                      # extract your own states Z_A on exactly these rows
        reply = fits.fit([Z_train, Z_val], fits.public_set()["fingerprint"])
        # reply.cross[p] = Σ_rows (z_A - reply.client_shift)ᵀ (z_B - mu_B) of part p, d_A × d_B

The client normalises each part with its train part's mean and std, encrypts it in chunks under a ring-LWE key
made here (only its public half is sent), and undoes the scaling after decryption. `lightning_modules.parties.private_fit`
turns the reply into the ridge map. Numpy, httpx and `encrypted` only.
"""
from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import httpx
import numpy as np

from encrypted import EncryptedError, FitKeys, GramPlan, decrypt_gram, encrypt_chunk

from .fit_stats import column_squares, normalise, train_normaliser
from .http_client import (NO_RETRY, Connection, Retry, ServeError, ServerReplyError, ServerUnreachable, Traffic,
                          server_ms)
from .protocol import API_PREFIX
from .formats.digests import texts_fingerprint

Progress = Callable[[int, int], Any]  # (public rows sent, public rows in all)
MAX_TEXT_PAGES = 1 << 20  # a bound on the paging loop against a server whose `next` never ends
FIT_SESSION_LOST = "fit_session_lost"  # the provider lost the fit's accumulators (a replica restart): start again


@dataclass
class GramReply:
    """What a private fit returns to the client (nothing here is the provider's states)."""

    cross: list[np.ndarray]  # per part: Σ_rows (z_A - client_shift)ᵀ (z_B - mu_B), d_A × d_B, float64
    client_shift: np.ndarray  # (d_A,) the client's train mean, subtracted before encryption
    stats: dict[str, Any]  # the provider's {"mu_B", "s_B", "parts": [{"rows", "sum_y", "yty_diag"|None, "trace"}]}
    plan: dict[str, Any]  # the GramPlan's dict
    bytes_sent: int
    bytes_received: int
    provider_ms: float  # sum of the provider's Server-Timing over the chunks
    client_ms: float  # key generation, normalisation, encryption and decryption here


def check_stats(stats: Any, part_rows: Sequence[int], target_dim: int) -> dict[str, Any]:
    """The provider's published statistics, their shape and values checked (a hostile server gets a clear error)."""
    def bad(problem: str) -> ServeError:
        return ServeError(f"the provider's fit statistics are unusable ({problem}); use a server of the same xsilo "
                          "version")

    if not isinstance(stats, dict) or not isinstance(stats.get("parts"), list):
        raise bad("not an object with 'mu_B', 's_B' and 'parts'")
    vectors = {}
    for key in ("mu_B", "s_B"):
        try:
            vectors[key] = np.asarray(stats.get(key), dtype=np.float64)
        except (TypeError, ValueError):
            raise bad(f"{key} is not a list of numbers") from None
        if vectors[key].shape != (target_dim,) or not np.isfinite(vectors[key]).all():
            raise bad(f"{key} must hold {target_dim} finite numbers")
    if not (vectors["s_B"] > 0).all():
        raise bad("s_B must be positive")
    if len(stats["parts"]) != len(part_rows):
        raise bad(f"{len(stats['parts'])} parts published for a plan of {len(part_rows)}")
    for index, (part, rows) in enumerate(zip(stats["parts"], part_rows)):
        if not isinstance(part, dict) or part.get("rows") != rows:
            raise bad(f"part {index} must say rows={rows}")
        for key in ("sum_y", "yty_diag"):
            if part.get(key) is None and (key == "sum_y" or index != 1):
                raise bad(f"part {index} lacks {key}")
            if part.get(key) is not None:
                try:
                    value = np.asarray(part[key], dtype=np.float64)
                except (TypeError, ValueError):
                    raise bad(f"part {index}'s {key} is not a list of numbers") from None
                if value.shape != (target_dim,) or not np.isfinite(value).all():
                    raise bad(f"part {index}'s {key} must hold {target_dim} finite numbers")
        trace = part.get("trace")
        if isinstance(trace, bool) or not isinstance(trace, (int, float)) or not math.isfinite(trace) or trace < 0:
            raise bad(f"part {index}'s trace must be a finite number >= 0")
    return stats


class PrivateFitClient:
    """Talks to the private-fit routes of one xsilo server."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 120.0,
                 transport: httpx.BaseTransport | None = None, *, traffic: Traffic | None = None,
                 retry: Retry = Retry()):
        """`traffic` counts this client's bytes and requests in a command's account (see `Traffic`); `retry`: how
        refused or reset connections and 503 answers are retried (a chunk, whose repeat the provider refuses, only
        when it never reached the server)."""
        self.connection = Connection(url, api_key, timeout, transport, traffic=traffic, retry=retry)
        self._info: dict[str, Any] | None = None

    def model_info(self, refresh: bool = False) -> dict[str, Any]:
        """GET /v1/model as a dict."""
        if self._info is None or refresh:
            info = self.connection.json("GET", f"{API_PREFIX}/model")
            if not isinstance(info, dict):
                raise ServeError("the server's /v1/model answer is not a JSON object; is it an xsilo server?")
            self._info = info
        return self._info

    def public_set(self) -> dict[str, Any]:
        """The public set the server publishes (/v1/model "public_set"); ServeError when it publishes none."""
        public = self.model_info().get("public_set")
        if not isinstance(public, dict):
            raise ServeError(f"the server at {self.connection.url} publishes no public set, so it offers no private "
                             "fit; ask its operator to serve one (xsilo serve --public DIR)")
        try:
            rows, parts = int(public["rows"]), [int(public["parts"][name]) for name in ("train", "val")]
            str(public["fingerprint"]), float(public["val_fraction"]), int(public["seed"])
        except (KeyError, TypeError, ValueError):
            raise ServeError("the server's public_set entry lacks rows, parts, fingerprint, val_fraction or seed; "
                             "use a client of the same xsilo version as the server") from None
        if rows < 1 or min(parts) < 1 or sum(parts) != rows:
            raise ServeError(f"the server's public set says {rows} rows split {parts}, which do not add up")
        anchors = public.get("anchors")
        if anchors is not None and not (isinstance(anchors, dict) and isinstance(anchors.get("rows"), int)
                                        and not isinstance(anchors["rows"], bool) and anchors["rows"] >= 1
                                        and isinstance(anchors.get("fingerprint"), str)):
            raise ServeError("the server's public_set.anchors is not null or {\"rows\", \"fingerprint\"}; use a "
                             "client of the same xsilo version as the server")
        return public

    def public_texts(self) -> list[str]:
        """Every text of the public set, in order, all pages; the count and the fingerprint are checked."""
        public = self.public_set()
        return self._texts("texts", public["rows"], public["fingerprint"], "public texts")

    def anchor_texts(self) -> list[str]:
        """Every anchor text of the public set, in order (empty when it has none); count and fingerprint checked.
        A client extracts its states on them as on the public texts: they are the fit's last part."""
        anchors = self.public_set().get("anchors")
        if anchors is None:
            return []
        return self._texts("anchors", anchors["rows"], anchors["fingerprint"], "anchor texts")

    def fit_part_rows(self) -> list[int]:
        """The rows of each part of a private fit with this server: train, val, then the anchors if any."""
        public = self.public_set()
        anchors = public.get("anchors")
        return [int(public["parts"][name]) for name in ("train", "val")] + ([anchors["rows"]] if anchors else [])

    def _texts(self, route: str, rows: int, fingerprint: str, what: str) -> list[str]:
        texts: list[str] = []
        offset = 0
        for _ in range(MAX_TEXT_PAGES):
            page = self.connection.json("GET", f"{API_PREFIX}/public-set/{route}", params={"offset": offset})
            chunk = page.get("texts") if isinstance(page, dict) else None
            if not (isinstance(chunk, list) and all(isinstance(t, str) for t in chunk)) \
                    or page.get("offset") != offset:
                raise ServeError(f"the server's page of {what} is not {{\"texts\": [str], \"offset\", \"next\"}}")
            texts.extend(chunk)
            following = page.get("next")
            if following is None:
                break
            if not isinstance(following, int) or following != offset + len(chunk) or not chunk or following > rows:
                raise ServeError(f"the server's paging of {what} is inconsistent (offset {offset}, {len(chunk)} "
                                 f"texts, next {following!r:.40})")
            offset = following
        if len(texts) != rows:
            raise ServeError(f"the server sent {len(texts)} {what} but says there are {rows}")
        if texts_fingerprint(texts) != fingerprint:
            raise ServeError(f"the {what} the server sent do not match its own fingerprint {str(fingerprint)[:16]}; "
                             "try again, or ask the operator to re-export them")
        return texts

    def val_logits(self, head: str) -> np.ndarray:
        """Head `head`'s plaintext logits (n_val, k) on the public set's val rows, in val-index order, all pages
        (GET /v1/public-set/val-logits; the provider opts in with --publish_val_logits true). Shapes and values
        are checked against /v1/model. The server charges every row to this client's row budget of the head, as
        it charges query rows (counted in `traffic.rows_charged`)."""
        public = self.public_set()
        heads = self.model_info().get("heads") or {}
        if not isinstance(heads, dict) or head not in heads:
            names = sorted(heads) if isinstance(heads, dict) else []
            raise ServeError(f"the server serves no head {head[:64]!r}; it serves {names}: pass one of them to --head")
        if not public.get("val_logits"):
            raise ServeError(f"the server at {self.connection.url} does not publish its heads' logits on the public "
                             "validation rows, which the head-aware λ needs; ask its operator to serve with "
                             "--publish_val_logits true, or align without --head (λ by GCV)")
        try:
            k = int(heads[head]["output_dim"])
        except (KeyError, TypeError, ValueError):
            raise ServeError(f"the server's entry for head {head!r} lacks output_dim; use a client of the same "
                             "xsilo version as the server") from None
        rows = int(public["parts"]["val"])
        pages: list[np.ndarray] = []
        offset = 0
        for _ in range(MAX_TEXT_PAGES):
            page = self.connection.json("GET", f"{API_PREFIX}/public-set/val-logits",
                                        params={"head": head, "offset": offset})
            chunk = page.get("logits") if isinstance(page, dict) else None
            if not isinstance(chunk, list) or page.get("offset") != offset or page.get("rows") != rows:
                raise ServeError("the server's val-logits page is not {\"logits\": [[float]], \"rows\", \"offset\", "
                                 f"\"next\"}} for the {rows} val rows /v1/model announces")
            try:
                values = np.asarray(chunk, dtype=np.float64)
            except (TypeError, ValueError):
                values = np.zeros((0, 0))
            if values.shape != (len(chunk), k):
                raise ServeError(f"the server's val logits must be rows of {k} numbers (head {head!r} has {k} "
                                 "outputs)")
            if not np.isfinite(values).all():
                raise ServeError("the server's val logits hold NaN or inf; ask its operator to check the head")
            pages.append(values)
            self.connection.traffic.rows_charged += len(chunk)
            offset += len(chunk)
            following = page.get("next")
            if following is None:
                break
            if not isinstance(following, int) or isinstance(following, bool) or following != offset or not chunk \
                    or following > rows:
                raise ServeError(f"the server's val-logits paging is inconsistent (offset {offset - len(chunk)}, "
                                 f"{len(chunk)} rows, next {following!r:.40})")
        if offset != rows:
            raise ServeError(f"the server sent {offset} val logits but its public set has {rows} val rows")
        return np.concatenate(pages, axis=0)

    def fit(self, parts: Sequence[np.ndarray], fingerprint: str, progress: Progress | None = None) -> GramReply:
        """Run a private fit on the client's raw states of each public-set part (train, val: the server's split;
        then the anchor texts' states when the set has anchors, `fit_part_rows`).

        `fingerprint` is that of the texts the states were extracted on; the server refuses another (409), and so
        it does anchors other than those this client read (`anchor_texts`: their fingerprint goes with it). The
        parts may be memory-mapped: they are read, normalised and encrypted one chunk at a time (the next chunk is
        encrypted while the server adds the current one), so memory is bounded by the chunk, not the pool.
        `progress(rows_sent, rows_total)` is called with 0 when the upload starts, then after each chunk."""
        public = self.public_set()
        expected = self.fit_part_rows()
        names = "train, val" + (", anchors" if len(expected) > 2 else "")
        arrays = [p if isinstance(p, np.ndarray) else np.asarray(p, dtype=np.float64) for p in parts]
        if len(arrays) != len(expected) or any(a.ndim != 2 for a in arrays):
            raise ServeError(f"pass one (rows, d_A) array per part of this server's fit ({names}): {len(expected)} "
                             "parts")
        if [len(a) for a in arrays] != expected:
            raise ServeError(f"the parts have {[len(a) for a in arrays]} rows but the server's fit parts ({names}) "
                             f"have {expected}; split your states with the public set's val_fraction and seed, and "
                             "extract them on the anchor texts (anchor_texts())")
        source_dim = arrays[0].shape[1]
        if any(a.shape[1] != source_dim for a in arrays) or source_dim < 1:
            raise ServeError("every part must have the same number of columns (the client's state dimension)")

        connection = self.connection
        sent0, received0 = connection.bytes_sent, connection.bytes_received
        plan = self._plan(source_dim, expected, int(public["hidden_size"]))
        t0 = time.perf_counter()
        keys = FitKeys.generate(plan)
        shift, scale = train_normaliser(arrays[0])
        try:  # every part checked, and its scaling chosen, before a fit is opened
            shifts = [plan.column_shift(part, column_squares(a, shift, scale)) for part, a in enumerate(arrays)]
        except EncryptedError:
            shifts = None
        if shifts is None or not (np.isfinite(shift).all() and np.isfinite(scale).all()):
            raise ServeError("the client's states hold NaN or inf (or values too large to normalise); re-extract "
                             "them")
        client_s = time.perf_counter() - t0
        for attempt in range(2):
            try:
                cross, stats, provider_ms, spent_s = self._run(keys, plan, arrays, (shift, scale, shifts),
                                                               fingerprint, (public.get("anchors") or {}).get(
                                                                   "fingerprint"), progress)
                break
            except ServerReplyError as exc:  # a replica restart lost the accumulators: the fit starts again, once
                if exc.code != FIT_SESSION_LOST or attempt:
                    raise
        return GramReply(cross, shift, stats, plan.to_dict(), connection.bytes_sent - sent0,
                         connection.bytes_received - received0, provider_ms, (client_s + spent_s) * 1000)

    def _run(self, keys: FitKeys, plan: GramPlan, arrays: list[np.ndarray], scaling: tuple[Any, Any, list[int]],
             fingerprint: str, anchors: str | None, progress: Progress | None
             ) -> tuple[list[np.ndarray], dict[str, Any], float, float]:
        """One fit session: open it with the fit key, send every chunk in order (encrypting the next while the
        server adds this one), fetch and decrypt each part's results; (cross products, the provider's stats, its
        HE ms, the client's seconds). `scaling`: the train mean and scale, and each part's power-of-two shift."""
        connection, (shift, scale, shifts) = self.connection, scaling
        opened = connection.json("POST", f"{API_PREFIX}/fit/sessions", content=keys.public_bytes(), expect=(201,),
                                 params={"source_dim": plan.source_dim, "fingerprint": fingerprint,
                                         **({"anchors": anchors} if anchors is not None else {})},
                                 idempotent=False)
        if not isinstance(opened, dict) or not isinstance(opened.get("session_id"), str):
            raise ServeError("the server's fit session answer has no session_id")
        if opened.get("plan") != plan.to_dict():
            raise ServeError("the server opened the fit with another plan than GET /v1/fit/plan gave; retry")
        stats = check_stats(opened.get("stats"), list(plan.part_rows), plan.target_dim)
        session = f"{API_PREFIX}/fit/sessions/{opened['session_id']}"
        provider_ms, client_s, cross = 0.0, 0.0, []
        order = [(part, chunk) for part in range(len(plan.part_rows)) for chunk in range(plan.chunks(part))]

        def encrypted(index: int) -> tuple[bytes, float]:
            part, chunk = order[index]
            t0 = time.perf_counter()
            rows = arrays[part][chunk * plan.chunk_rows:chunk * plan.chunk_rows + plan.rows(part, chunk)]
            try:
                message = encrypt_chunk(keys, plan, part, chunk,
                                        normalise(rows, shift, scale) * 2.0 ** -shifts[part])
            except EncryptedError as exc:
                raise ServeError(f"cannot encrypt chunk {chunk} of part {part}: {exc}") from None
            return message, time.perf_counter() - t0

        rows_sent, rows_total = 0, sum(plan.part_rows)
        if progress is not None:
            progress(0, rows_total)  # the upload starts: a caller times its rate from here
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="xsilo-encrypt") as encryptor:
            try:
                upcoming = encryptor.submit(encrypted, 0)
                for index, (part, chunk) in enumerate(order):
                    message, spent = upcoming.result()
                    client_s += spent
                    if index + 1 < len(order):
                        upcoming = encryptor.submit(encrypted, index + 1)
                    provider_ms += self._send_chunk(session, part, chunk, message)
                    rows_sent += plan.rows(part, chunk)
                    if progress is not None:
                        progress(rows_sent, rows_total)
                    if chunk + 1 == plan.chunks(part):
                        results = [connection.request("GET", f"{session}/parts/{part}/result/{group}",
                                                      max_bytes=plan.result_max_bytes, idempotent=False).content
                                   for group in range(plan.groups)]
                        t0 = time.perf_counter()
                        try:
                            gram = decrypt_gram(keys, plan, part, results)
                        except EncryptedError as exc:
                            raise ServeError(f"the server's fit result for part {part} is unusable ({exc}); use a "
                                             "server of the same xsilo version") from None
                        gram *= 2.0 ** shifts[part]  # this side's own scaling of the part (the provider's is undone)
                        cross.append(scale[:, None] * gram * np.asarray(stats["s_B"], dtype=np.float64)[None, :])
                        client_s += time.perf_counter() - t0
            finally:
                try:
                    connection.request("DELETE", session, expect=(204, 404), retry=NO_RETRY)
                except ServeError:
                    pass  # the session expires on the server anyway
        return cross, stats, provider_ms, client_s

    def _send_chunk(self, session: str, part: int, chunk: int, message: bytes) -> float:
        """POST one chunk; the server's HE ms. When the answer is lost (the connection dropped after the body
        left), ask the server where the fit stands and resend only if the chunk did not arrive."""
        connection = self.connection
        for attempt in range(2):
            try:
                response = connection.request("POST", f"{session}/parts/{part}/chunks/{chunk}", content=message,
                                              idempotent=False)
                return server_ms(response)
            except ServerUnreachable:
                if attempt:
                    raise
                state = connection.json("GET", session)
                at = (state.get("part"), state.get("next_chunk")) if isinstance(state, dict) else None
                if not (isinstance(at, tuple) and isinstance(at[0], int) and isinstance(at[1], (int, type(None)))):
                    raise ServeError("the server's fit progress answer is not {\"part\", \"next_chunk\", ...}")
                if at[0] > part or (at[0] == part and at[1] is not None and at[1] > chunk):
                    return 0.0  # the server took the chunk; only its answer was lost
                if at != (part, chunk):
                    raise ServeError(f"the server expects chunk {at[1]} of part {at[0]}, behind chunk {chunk} of "
                                     f"part {part}; start the fit again")
        raise AssertionError("unreachable")

    def _plan(self, source_dim: int, part_rows: list[int], target_dim: int) -> GramPlan:
        data = self.connection.json("GET", f"{API_PREFIX}/fit/plan", params={"source_dim": source_dim})
        try:
            plan = GramPlan.from_dict(data)
        except ValueError as exc:
            raise ServeError(f"the server's fit plan is unusable ({str(exc)[:200]}); use a client of the same xsilo "
                             "version as the server") from None
        if plan.source_dim != source_dim or list(plan.part_rows) != part_rows or plan.target_dim != target_dim:
            raise ServeError(f"the server's fit plan is for {plan.source_dim}-d clients, parts {list(plan.part_rows)} "
                             f"and {plan.target_dim}-d targets; expected {source_dim}, {part_rows}, {target_dim}")
        return plan

    def close(self) -> None:
        self.connection.close()

    def __enter__(self) -> "PrivateFitClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
