"""Executes frontend programs against a backend.

Each program state owns a :class:`StreamExecutor`: a queue of expressions and one worker
thread draining it. The program's Python code runs in the caller's thread and only *queues*
work (``s += gen(...)`` returns at once); it blocks only when it reads a value (``s["x"]``).
That asynchrony is what makes ``fork`` useful: each branch has its own worker, so the
branches' requests reach the engine together and are batched.

Invariants:
- An executor never hangs a reader: an error (in a backend call or in the program's own code)
  is recorded once, later expressions are skipped, and every waiter wakes and sees it.
- ``sync()`` returns once every expression submitted so far was executed or skipped.
- A variable is readable only once every queued expression that writes it has run: each
  pending write is counted, so ``separate_reasoning`` (a second write of a gen's variable)
  keeps readers from seeing the unsplit text.
"""

from __future__ import annotations

import queue
import threading
import uuid
from typing import Any, Iterator

from plait.frontend import ir
from plait.frontend.backends.base import resolve_backend
from plait.frontend.definition import ProgramDefinition
from plait.frontend.global_config import global_config
from plait.frontend.parallel_encoding import concat_and_append
from plait.frontend.reasoning import split_reasoning
from plait.frontend.speculative import ApiSpeculation
from plait.frontend.state import ProgramState

_END = object()


class StreamExecutor:
    def __init__(
        self,
        backend: Any,
        arguments: dict[str, Any],
        defaults: ir.GenParams,
        chat_template: Any,
        stream: bool,
        num_api_spec_tokens: int | None = None,
    ):
        self.sid = uuid.uuid4().hex
        self.backend = backend
        self.arguments = arguments
        self.defaults = defaults
        self.chat_template = chat_template
        self.stream = stream
        # fork branches never speculate (as in SGLang): they would share one speculation
        self.speculation = (
            ApiSpeculation(num_api_spec_tokens) if num_api_spec_tokens is not None else None
        )

        self.text_ = ""
        self.messages_: list[dict[str, str]] = []
        self.variables: dict[str, Any] = {}
        self.meta_info: dict[str, Any] = {}
        self.spans: dict[str, tuple[int, int]] = {}  # where a gen/select's text lies in text_
        self.cur_role: str | None = None
        self.cur_role_begin_pos = 0
        self.fork_start_text_pos = 0
        # after a join over KV: the token ids of text_[:kv_text_len] (plait.frontend.parallel_encoding)
        self.kv_ids: list[int] | None = None
        self.kv_text_len = 0
        self.error_: BaseException | None = None
        self.finished = False  # the worker has exited
        self.children: list[StreamExecutor] = []

        self._cv = threading.Condition()
        self._pending: dict[str, int] = {}  # variable -> queued writes not yet executed
        self._unwritten: set[str] = set()  # variables whose writes an error cancelled
        self._scope_start: dict[str, int] = {}
        self._unfinished = 0
        self._ended = False
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._work, name=f"plait-exec-{self.sid[:6]}", daemon=True).start()

    # ---- called from the program's thread -------------------------------------------------
    def submit(self, expr: Any) -> None:
        expr = ir.to_expr(expr)
        with self._cv:
            if self._ended:
                raise RuntimeError("this program state has ended; cannot append to it")
            if self.error_ is not None:
                return  # the program already failed; nothing after the failure runs
            for name in _produced_names(expr):
                self._pending[name] = self._pending.get(name, 0) + 1
            self._unfinished += 1
        self._queue.put(expr)

    def sync(self) -> None:
        with self._cv:
            self._cv.wait_for(lambda: self._unfinished == 0 or self.finished)

    def end(self) -> None:
        """No more expressions will come; the worker exits after draining the queue."""
        with self._cv:
            if self._ended:
                return
            self._ended = True
        self._queue.put(_END)
        for child in self.children:
            child.end()

    def fail(self, error: BaseException) -> None:
        """Record the first error and wake every waiter."""
        with self._cv:
            if self.error_ is None:
                self.error_ = error
            self._unwritten.update(self._pending)
            self._pending.clear()
            self._cv.notify_all()

    def get_var(self, name: str) -> Any:
        with self._cv:
            self._cv.wait_for(lambda: name not in self._pending or self.error_ is not None)
            if name in self.variables and name not in self._pending and name not in self._unwritten:
                return self.variables[name]
            if self.error_ is not None:
                raise self.error_
            raise KeyError(f"no variable {name!r} in this program state")

    def set_var(self, name: str, value: Any) -> None:
        with self._cv:
            self.variables[name] = value

    def get_meta_info(self, name: str) -> Any:
        self.get_var(name)
        return self.meta_info.get(name)

    def fork(self, size: int) -> list["StreamExecutor"]:
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"fork size must be a positive integer, got {size!r}")
        if size > 1:
            self.submit(ir.CommitPrefix())  # branches then find the shared prefix cached
        self.sync()
        self.raise_if_failed()
        children = []
        for _ in range(size):
            child = StreamExecutor(
                self.backend, self.arguments, self.defaults, self.chat_template, self.stream
            )
            child.variables = dict(self.variables)
            child.text_ = self.text_
            child.messages_ = list(self.messages_)
            child.cur_role, child.cur_role_begin_pos = self.cur_role, self.cur_role_begin_pos
            child.fork_start_text_pos = len(self.text_)
            children.append(child)
        self.children.extend(children)
        return children

    def raise_if_failed(self) -> None:
        if self.error_ is not None:
            raise self.error_

    def iter_chunks(self, var: str | None = None) -> Iterator[str]:
        """Yield the text (or one variable) as it grows; ends when it is complete."""

        def source() -> str:
            return self.text_ if var is None else str(self.variables.get(var, ""))

        def done() -> bool:
            if self.error_ is not None or self.finished:
                return True
            return var is not None and var in self.variables and var not in self._pending

        sent = 0
        while True:
            with self._cv:
                self._cv.wait_for(lambda: len(source()) > sent or done())
                chunk, complete = source()[sent:], done()
            sent += len(chunk)
            if chunk:
                yield chunk
            if complete:
                self.raise_if_failed()
                return

    # ---- the worker thread ----------------------------------------------------------------
    def _work(self) -> None:
        while True:
            expr = self._queue.get()
            if expr is _END:
                break
            if self.error_ is None:
                try:
                    self._execute(expr)
                except BaseException as e:  # noqa: BLE001 - surfaced on the state
                    self.fail(e)
            with self._cv:
                self._unfinished -= 1
                self._cv.notify_all()
        with self._cv:
            self.finished = True
            self._pending.clear()
            self._cv.notify_all()

    def _execute(self, expr: ir.Expr) -> None:
        if isinstance(expr, ir.ExprList):
            for e in expr.exprs:
                self._execute(e)
        elif isinstance(expr, ir.Constant):
            self._fill(expr.value)
        elif isinstance(expr, ir.Gen):
            self._gen(expr)
        elif isinstance(expr, ir.Select):
            decision = self.backend.select(
                self, expr.choices, expr.temperature, expr.choices_method
            )
            self._fill_result(expr.name, decision.decision, decision.meta_info)
        elif isinstance(expr, ir.RoleBegin):
            self._role_begin(expr.role)
        elif isinstance(expr, ir.RoleEnd):
            self._role_end(expr.role)
        elif isinstance(expr, ir.VarScopeBegin):
            self._scope_start[expr.name] = len(self.text_)
        elif isinstance(expr, ir.VarScopeEnd):
            self._set_result(expr.name, self.text_[self._scope_start.pop(expr.name) :], None)
        elif isinstance(expr, ir.CommitPrefix):
            if self.text_:
                self.backend.cache_prefix(self.text_)
        elif isinstance(expr, ir.SeparateReasoning):
            self._separate_reasoning(expr)
        elif isinstance(expr, ir.ConcatAndAppend):
            concat_and_append(self, expr.states)
        else:
            raise TypeError(f"cannot execute {expr!r}")

    def _fill(self, text: str, from_speculation: bool = False) -> None:
        """Append ``text``; unless a gen took it from the speculation, the speculation must
        have predicted it to survive."""
        if self.speculation is not None and not from_speculation:
            self.speculation.follow(text)
        with self._cv:
            self.text_ += text
            self._cv.notify_all()

    def _set_result(self, name: str | None, value: Any, meta: Any) -> None:
        with self._cv:
            if name is not None:
                self.variables[name] = value
                self.meta_info[name] = meta
                left = self._pending.pop(name, 0) - 1
                if left > 0:
                    self._pending[name] = left
            self._cv.notify_all()

    def _fill_result(
        self, name: str | None, text: str, meta: Any, from_speculation: bool = False
    ) -> None:
        """Append a gen/select's text and publish it as variable ``name``."""
        start = len(self.text_)
        self._fill(text, from_speculation)
        if name is not None:
            self.spans[name] = (start, len(self.text_))
        self._set_result(name, text, meta)

    def _separate_reasoning(self, expr: ir.SeparateReasoning) -> None:
        """Replace each named result by its answer, in the variable and in the text (last
        first, so earlier spans keep their offsets); the reasoning goes to its own variable."""
        if self.stream:
            raise ValueError(
                "separate_reasoning does not work with stream=True: the reasoning "
                "was already streamed as part of the text"
            )
        for name in sorted(expr.names, key=lambda n: self.spans[n][0], reverse=True):
            start, end = self.spans[name]
            split_by_server = (self.meta_info.get(name) or {}).get("reasoning_content")
            if split_by_server is not None:  # an OpenAI server's --reasoning-parser did it
                reasoning, answer = split_by_server, self.variables[name]
            else:
                reasoning, answer = split_reasoning(self.variables[name], expr.model_type)
            with self._cv:
                self.text_ = self.text_[:start] + answer + self.text_[end:]
            self.spans[name] = (start, start + len(answer))
            self._set_result(name, answer, self.meta_info.get(name))
            self._set_result(expr.reasoning_name(name), reasoning, None)

    def _gen(self, expr: ir.Gen) -> None:
        params = expr.params.merged_over(self.defaults)
        params.apply_dtype()
        if self.speculation is not None:
            if self.stream:
                raise ValueError("num_api_spec_tokens does not work with stream=True")
            text, meta = self.speculation.generate(self, self.backend, params)
            self._fill_result(expr.name, text, meta, from_speculation=True)
            return
        if not self.stream:
            text, meta = self.backend.generate(self, params)
            self._fill_result(expr.name, text, meta)
            return
        name = expr.name if expr.name is not None else f"_gen_{uuid.uuid4().hex[:8]}"
        with self._cv:
            self.variables[name] = ""
        meta = None
        for delta, meta in self.backend.generate_stream(self, params):
            with self._cv:
                self.text_ += delta
                self.variables[name] += delta
                self.meta_info[name] = meta
                self._cv.notify_all()
        self._set_result(name, self.variables[name], meta)

    def _role_begin(self, role: str) -> None:
        if self.cur_role is not None:
            raise ValueError(
                f"role {role!r} begins inside role {self.cur_role!r}; roles cannot nest"
            )
        prefix, _ = self.chat_template.prefix_and_suffix(role, self.messages_)
        self._fill(prefix)
        self.cur_role, self.cur_role_begin_pos = role, len(self.text_)

    def _role_end(self, role: str) -> None:
        if self.cur_role != role:
            raise ValueError(f"role {role!r} ends but the open role is {self.cur_role!r}")
        content = self.text_[self.cur_role_begin_pos :]
        _, suffix = self.chat_template.prefix_and_suffix(role, self.messages_)
        self._fill(suffix)
        with self._cv:
            self.messages_.append({"role": role, "content": content})
        self.cur_role = None


def _produced_names(expr: ir.Expr) -> list[str]:
    if isinstance(expr, ir.ExprList):
        return [n for e in expr.exprs for n in _produced_names(e)]
    if isinstance(expr, (ir.Gen, ir.Select, ir.VarScopeBegin)) and expr.name is not None:
        return [expr.name]
    if isinstance(expr, ir.SeparateReasoning):
        return [*expr.names, *map(expr.reasoning_name, expr.names)]
    return []


# ---- running programs ---------------------------------------------------------------------
def run_program(
    program: ProgramDefinition,
    backend: Any,
    args: tuple,
    kwargs: dict[str, Any],
    defaults: ir.GenParams,
    stream: bool = False,
) -> Any:
    """Run ``program`` once. Never raises for errors inside the program: they are recorded
    on the returned state (``state.error()``) and re-raised when a result is read."""
    backend = resolve_backend(backend)
    kwargs = {**program.bind_arguments, **kwargs}
    executor = StreamExecutor(
        backend, kwargs, defaults, backend.chat_template, stream, program.num_api_spec_tokens
    )
    state = ProgramState(executor)

    def body() -> None:
        try:
            state.ret_value = program.func(state, *args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - surfaced on the state
            executor.fail(e)
        finally:
            executor.end()
        executor.sync()
        if global_config.verbosity >= 2 and executor.error_ is None:
            print(executor.text_)

    if stream:
        threading.Thread(target=body, name="plait-program", daemon=True).start()
    else:
        body()
    return state
