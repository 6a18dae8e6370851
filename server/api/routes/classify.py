"""/v1/classify: labels and scores per input under a sequence-classification fine-tune."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from server.api.deps import SchedulerDep, StateDep, require_api_key
from server.api.routes.common import resolve_model, unless_client_left
from server.api.schemas import ClassifyRequest, ClassifyResponse

router = APIRouter(prefix="/v1", tags=["inference"], dependencies=[Depends(require_api_key)])


@router.post("/classify", response_model=ClassifyResponse)
async def classify(
    body: ClassifyRequest, request: Request, state: StateDep, sched: SchedulerDep
) -> ClassifyResponse:
    """``scores[label] = softmax(head(pooled))[label]``; ``label`` is the argmax."""
    target, _ = await resolve_model(
        state, request, body.model, ("sequence-classification",), "/v1/classify"
    )
    # the labels of the head that ran, not those read before the request waited
    probs, labels = await unless_client_left(request, sched.classify(target, body.texts))
    return ClassifyResponse.from_probs(body.model, probs, labels)
