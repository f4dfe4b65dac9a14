"""The engine's LoRA controls: loading and unloading adapters at run time, and the check a
request passes on the scheduler thread. The adapters themselves are ``plait.lora``'s manager
(the model runner's ``adapters``); this module only routes calls to the scheduler thread,
where every request the scheduler holds is visible."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from plait.core.finish_reason import FinishReason
from plait.core.request import Req


class LoraControl:
    """``manager``: the LoRA manager (None: the engine serves no adapters); ``call`` runs a
    function on the scheduler thread and returns its result (or raises its error)."""

    def __init__(self, manager: Any, scheduler: Any, call: Callable[[Callable[[], Any]], Any]):
        self.manager = manager
        self.scheduler = scheduler
        self.call = call

    def load(self, lora_name: str, lora_path: str) -> None:
        """Load a PEFT adapter under ``lora_name``; ValueError naming what is wrong."""
        manager = self._manager()
        self.call(lambda: manager.load(lora_name, lora_path))

    def unload(self, lora_name: str) -> None:
        """Unload an adapter; refused (ValueError naming it) while a request uses it."""
        manager = self._manager()

        def unload() -> None:
            busy = self.scheduler.table.find_where(lambda r: r.lora_id == lora_name)
            if busy is not None:
                raise ValueError(
                    f"lora_name {lora_name!r} has requests in flight (e.g. {busy.rid}); "
                    "unload it once they finish"
                )
            manager.unload(lora_name)

        self.call(unload)

    def names(self) -> list[str]:
        return [] if self.manager is None else self.call(self.manager.names)

    def info(self) -> dict[str, Any]:
        return {} if self.manager is None else self.manager.info()

    def guard(self, add: Callable[[Req], None]) -> Callable[[Req], None]:
        """``add`` for the scheduler thread: a request whose adapter was unloaded (or
        replaced) after intake ends alone with an abort naming it."""
        if self.manager is None:
            return add
        uids = self.manager.uids

        def checked(req: Req) -> None:
            if req.lora_id is not None and uids.get(req.lora_id) != req.cache_namespace:
                self.scheduler.finish_unscheduled(
                    req, FinishReason.abort(f"lora_path {req.lora_id!r} was unloaded")
                )
                return
            add(req)

        return checked

    def _manager(self) -> Any:
        if self.manager is None:
            raise ValueError(
                "lora_name: this engine serves no LoRA adapters (start it with "
                "lora_paths or max_lora_rank)"
            )
        return self.manager
