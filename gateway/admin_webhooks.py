"""The admin's webhooks: register one (its secret is made then and shown once), change its
URL, rooms and events, see how its delivery goes, enable (resuming where it stopped) or
disable it. Every change goes through the services (gateway/webhooks.py): rooms are
followed again, positions kept, validation as for the API.
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.forms.models import construct_instance
from django.http import HttpRequest, HttpResponse
from django.utils import timezone

from gateway import webhooks
from gateway.errors import GatewayError
from gateway.models import Webhook


class WebhookForm(forms.ModelForm):
    """The URL as text, rooms as comma-separated patterns, events as checkboxes, each
    checked by the services' own rules; no secret field (it is made by the service)."""

    url = forms.CharField(max_length=webhooks.URL_MAX, help_text="http:// or https://; "
                          "user:password@ in it is sent as basic authentication.")
    rooms = forms.CharField(
        help_text="Room names or patterns, comma-separated: * any characters, ? one "
                  "(for example lobby, sensors-*). * follows every room.")
    events = forms.MultipleChoiceField(
        choices=[(kind, kind) for kind in webhooks.EVENT_KINDS], required=False,
        widget=forms.CheckboxSelectMultiple, help_text="None checked: every kind.")

    class Meta:
        model = Webhook
        fields = ["name", "url", "rooms", "events", "enabled"]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.instance.pk is not None:
            self.initial["rooms"] = ", ".join(self.instance.rooms)

    def _post_clean(self) -> None:
        # The fields are checked by the services' rules above, not the model's: its URL
        # field would refuse a host without a dot (a compose service's name).
        construct_instance(self, self.instance, self._meta.fields, self._meta.exclude)

    def _checked(self, check, value: object) -> Any:
        try:
            return check(value)
        except GatewayError as exc:
            raise forms.ValidationError(exc.detail, code=exc.code) from None

    def clean_name(self) -> str:
        return self._checked(webhooks.webhook_name_validate, self.cleaned_data["name"])

    def clean_url(self) -> str:
        return self._checked(webhooks.webhook_url_validate, self.cleaned_data["url"])

    def clean_rooms(self) -> list[str]:
        return self._checked(webhooks.webhook_rooms_validate, self.cleaned_data["rooms"])

    def clean_events(self) -> list[str]:
        return self._checked(webhooks.webhook_events_validate, self.cleaned_data["events"])


def _when(moment) -> str:
    return timezone.localtime(moment).strftime("%Y-%m-%d %H:%M:%S") if moment else "-"


@admin.register(Webhook)
class WebhookAdmin(admin.ModelAdmin):
    form = WebhookForm
    list_display = ["name", "host", "room_list", "event_list", "state", "last_error",
                    "last_success_at"]
    list_filter = ["enabled"]
    search_fields = ["name", "url"]
    readonly_fields = ["secret_shown", "delivery_id_base", "state", "failing_since",
                       "last_error", "last_success_at", "paused_at", "created_at", "created_by"]
    actions = ["enable_webhooks", "disable_webhooks"]

    def get_fields(self, request: HttpRequest, obj: Webhook | None = None) -> list[str]:
        if obj is None:  # a new one is enabled; its secret is made when it is saved
            return ["name", "url", "rooms", "events"]
        return ["name", "url", "rooms", "events", "enabled", *self.readonly_fields]

    def get_readonly_fields(self, request: HttpRequest, obj: Webhook | None = None) -> list[str]:
        return list(self.readonly_fields) if obj is not None else []

    # --- the columns ---------------------------------------------------------------------------

    @admin.display(description="host")
    def host(self, webhook: Webhook) -> str:
        return webhooks.url_host(webhook.url)

    @admin.display(description="rooms")
    def room_list(self, webhook: Webhook) -> str:
        return ", ".join(webhook.rooms)

    @admin.display(description="events")
    def event_list(self, webhook: Webhook) -> str:
        return ", ".join(webhook.events) or "all"

    @admin.display(description="state")
    def state(self, webhook: Webhook) -> str:
        state = webhooks.webhook_state(webhook)
        if state == webhooks.STATE_FAILING:
            return f"FAILING since {_when(webhook.failing_since)}"
        if state == webhooks.STATE_PAUSED:
            return f"PAUSED since {_when(webhook.paused_at)} (failing too long)"
        return state

    @admin.display(description="secret")
    def secret_shown(self, webhook: Webhook) -> str:
        return "whsec_•••••••• (shown only when the webhook was registered)"

    @admin.display(description="delivery ids made from")
    def delivery_id_base(self, webhook: Webhook) -> str:
        return str(webhook.uid)

    # --- saving through the services ---------------------------------------------------------

    def save_model(self, request: HttpRequest, obj: Webhook, form: forms.ModelForm,
                   change: bool) -> None:
        data = form.cleaned_data
        if change:  # ``obj`` has the form's values already: the service compares the stored
            changed = {key: data[key] for key in form.changed_data if key in webhooks.CHANGEABLE}
            webhooks.webhook_update(webhook=Webhook.objects.get(pk=obj.pk), **changed)
            return
        created, secret = webhooks.webhook_create(
            name=data["name"], url=data["url"], rooms=data["rooms"], events=data["events"],
            created_by=request.user.get_username())
        for field in Webhook._meta.concrete_fields:  # the admin goes on with this object
            setattr(obj, field.attname, getattr(created, field.attname))
        obj._state.adding = False
        request._webhook_secret = secret  # for response_add, on this request only

    def response_add(self, request: HttpRequest, obj: Webhook,
                     post_url_continue: str | None = None) -> HttpResponse:
        secret = getattr(request, "_webhook_secret", None)
        if secret is not None:
            self.message_user(request, f"The secret of webhook “{obj.name}”, shown only now "
                              f"(the receiver verifies signatures with it): {secret}",
                              messages.WARNING)
        return super().response_add(request, obj, post_url_continue)

    def delete_model(self, request: HttpRequest, obj: Webhook) -> None:
        webhooks.webhook_delete(webhook=obj)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet) -> None:
        for webhook in queryset:
            webhooks.webhook_delete(webhook=webhook)

    # --- actions -------------------------------------------------------------------------------

    @admin.action(description="Enable (resume from where it stopped)")
    def enable_webhooks(self, request: HttpRequest, queryset: QuerySet) -> None:
        count = webhooks.webhooks_enable(webhooks=queryset, enabled=True)
        self.message_user(request, f"Enabled {count} webhook(s).", messages.SUCCESS)

    @admin.action(description="Disable")
    def disable_webhooks(self, request: HttpRequest, queryset: QuerySet) -> None:
        count = webhooks.webhooks_enable(webhooks=queryset, enabled=False)
        self.message_user(request, f"Disabled {count} webhook(s).", messages.SUCCESS)
