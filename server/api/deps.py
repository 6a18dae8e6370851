"""Dependencies: the app state and its parts, and the auth guards (override-friendly)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request

from server.api.auth import check_token
from server.api.state import AppState
from server.errors import NotReady
from server.scheduler import Scheduler
from server.settings import Settings


def get_state(request: Request) -> AppState:
    return request.app.state.darex


def get_settings_dep(state: Annotated[AppState, Depends(get_state)]) -> Settings:
    return state.settings


def get_scheduler(state: Annotated[AppState, Depends(get_state)]) -> Scheduler:
    if state.scheduler is None:
        raise NotReady("the base model is still loading")
    return state.scheduler


def get_engine(state: Annotated[AppState, Depends(get_state)]) -> Any:
    if state.engine is None:
        raise NotReady("the base model is still loading")
    return state.engine


def get_store(state: Annotated[AppState, Depends(get_state)]) -> Any:
    if state.store is None:
        raise NotReady("the delta store is not open")
    return state.store


def require_admin(request: Request, settings: Annotated[Settings, Depends(get_settings_dep)]):
    check_token(request, settings.admin_token.get_secret_value(), "/admin")


def require_api_key(request: Request, settings: Annotated[Settings, Depends(get_settings_dep)]):
    if settings.api_key is not None:
        check_token(request, settings.api_key.get_secret_value(), "/v1")


StateDep = Annotated[AppState, Depends(get_state)]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
SchedulerDep = Annotated[Scheduler, Depends(get_scheduler)]
EngineDep = Annotated[Any, Depends(get_engine)]
StoreDep = Annotated[Any, Depends(get_store)]
