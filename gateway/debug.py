"""What Django's error pages and error reports may show of the settings and the request."""

from __future__ import annotations

import re
from typing import Any

from django.views.debug import SafeExceptionReporterFilter

# user:password@ inside a URL (mqtt://, redis://, postgres://, https://...).
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/@\s]+)@")


def url_credentials_mask(text: str) -> str:
    """``text`` with the user information of every URL in it replaced."""
    return _URL_CREDENTIALS.sub(r"\g<scheme>********@", text)


class GatewayExceptionReporterFilter(SafeExceptionReporterFilter):
    """Django's filter (settings named like secrets are masked), plus: URLs never show the
    credentials inside them, and settings naming URLs or DSNs count as secrets by name too
    when they are not plain strings."""

    hidden_settings = re.compile(
        r"API|TOKEN|KEY|SECRET|PASS|SIGNATURE|HTTP_COOKIE|PASSWORDS|DSN", flags=re.I
    )

    def cleanse_setting(self, key: Any, value: Any) -> Any:
        cleansed = super().cleanse_setting(key, value)
        if isinstance(cleansed, str):
            return url_credentials_mask(cleansed)
        return cleansed

    def get_safe_request_meta(self, request) -> dict[str, Any]:
        meta = super().get_safe_request_meta(request)
        return {k: url_credentials_mask(v) if isinstance(v, str) else v for k, v in meta.items()}
