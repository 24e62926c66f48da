"""Telegram's webhook: ``POST /telegram/webhook/`` when ``TELEGRAM_WEBHOOK_URL`` is set."""

from __future__ import annotations

import hmac
import json
import logging

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from gateway.views import error_response
from protocols.telegram import handoff

logger = logging.getLogger(__name__)

TELEGRAM_SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"


@csrf_exempt
@require_POST
async def telegram_webhook(request: HttpRequest) -> HttpResponse:
    """Telegram posts each update here when ``TELEGRAM_WEBHOOK_URL`` is set.

    403 without the right secret header, 400 for a body that is not an update, 503 when the
    bot cannot take it now (Telegram delivers it again), 200 once it is handled.
    """
    log = {"protocol": "telegram", "scope": "webhook"}
    secret = settings.TELEGRAM["WEBHOOK_SECRET"]
    if not settings.TELEGRAM["WEBHOOK_URL"]:
        return error_response(404, "not_found", "the Telegram webhook is not enabled")
    given = request.headers.get(TELEGRAM_SECRET_HEADER, "")
    if not hmac.compare_digest(given.encode(), secret.encode()):
        logger.warning("refused a webhook call: wrong or missing secret", extra=log)
        return error_response(403, "forbidden", "wrong or missing secret token")
    try:
        update = json.loads(request.body)
    except (ValueError, RecursionError):  # bad UTF-8 or JSON, an int of 4,300+ digits, depth
        update = None
    if not isinstance(update, dict) or type(update.get("update_id")) is not int:
        logger.warning("refused a webhook call: not an update", extra=log)
        return error_response(
            400, "invalid_update", "the body must be a JSON update with an update_id"
        )
    handler = handoff.handler("telegram")
    if handler is None:
        return error_response(503, "unavailable", "the bot is not running in this process")
    try:
        await handler(update)
    except handoff.Rejected as exc:
        logger.warning("refused a webhook call: %s", exc, extra=log)
        return error_response(400, "invalid_update", str(exc))
    except (TimeoutError, handoff.Unavailable) as exc:
        logger.warning("could not take a webhook update now: %s", exc or "timed out", extra=log)
        return error_response(503, "unavailable", "try again later")
    return JsonResponse({"ok": True})
