"""SGLang's adapter routes: ``POST /load_lora_adapter`` and ``POST /unload_lora_adapter``
(docs/lora.md). The scheduler process does the work; a refusal (unknown name, a rank above
``--max-lora-rank``, an adapter with requests in flight) is a 400 naming it."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict

from plait.server.engine_client import EngineClient
from plait.server.protocol import APIError

router = APIRouter()


class LoadLoraRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    lora_name: str
    lora_path: str


class UnloadLoraRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    lora_name: str


async def _call(request: Request, name: str, path: str | None) -> dict[str, Any]:
    client: EngineClient = request.app.state.client
    if not client.lora_enabled:
        raise APIError(
            "lora_name: this server serves no LoRA adapters (start it with --lora-paths "
            "or --max-lora-rank)",
            param="lora_name",
        )
    result = await client.lora(name, path)
    if "error" in result:
        raise APIError(result["error"], param="lora_name", status=result.get("status", 400))
    return {"success": True, "message": "", "loaded_adapters": result.get("loaded", [])}


@router.post("/load_lora_adapter")
async def load_lora_adapter(body: LoadLoraRequest, request: Request) -> dict[str, Any]:
    return await _call(request, body.lora_name, body.lora_path)


@router.post("/unload_lora_adapter")
async def unload_lora_adapter(body: UnloadLoraRequest, request: Request) -> dict[str, Any]:
    return await _call(request, body.lora_name, None)
