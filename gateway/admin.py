"""Django admin for staff: rooms, messages, devices (their rooms and commands), bot chats
and blocked senders.

Changes with an effect on live connections go through the services (deleting a message
removes it from open pages too; closing a room disconnects its members), never straight to
the ORM.
"""

from __future__ import annotations

import json
import time

from django import forms
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from gateway import access, chats, events, selectors, services
from gateway.adapters import adapters_all
from gateway.errors import GatewayError
from gateway.models import (
    ApiKey,
    Attachment,
    BotChat,
    Device,
    DeviceCommand,
    DeviceRoom,
    Message,
    MessageRevision,
    Room,
    SenderBlock,
)
from gateway.policy import policy_update

admin.site.site_header = "Gateway administration"
admin.site.site_title = "Gateway admin"

_MEMBERS_TTL = 2.0
_members: tuple[float, dict[str, int]] = (0.0, {})


def _members_by_room() -> dict[str, int]:
    """Members now per room, read once for a whole admin page (and at most every 2 s)."""
    global _members
    stamp, counts = _members
    if time.monotonic() - stamp > _MEMBERS_TTL:
        counts = {}
        for entry in selectors.member_entries():
            counts[entry["room"]] = counts.get(entry["room"], 0) + 1
        _members = (time.monotonic(), counts)
    return counts


def _choices(names) -> list[tuple[str, str]]:
    return [(name, name) for name in sorted(names)]


class RoomPolicyForm(forms.ModelForm):
    """A room's policy as staff edit it; saved through ``services.room_policy_set``, so it
    applies live (gateway/policy.py)."""

    post_all = forms.BooleanField(required=False, initial=True,
                                  label="Every protocol may post")
    post = forms.MultipleChoiceField(required=False, widget=forms.CheckboxSelectMultiple,
                                     label="Else, the protocols that may post")
    receive_all = forms.BooleanField(required=False, initial=True,
                                     label="The room reaches every protocol")
    receive = forms.MultipleChoiceField(required=False, widget=forms.CheckboxSelectMultiple,
                                        label="Else, the protocols it reaches")
    name_format = forms.JSONField(
        required=False, initial=dict, label="How senders are shown to other protocols",
        help_text='{"telegram": "{name} via {protocol}"}: placeholders {name}, {protocol}, '
                  "{room}, {id}; a protocol left out shows names as they are")
    rate_per_second = forms.FloatField(required=False, min_value=0.001,
                                       label="Message rate limit (per second; empty: none)")
    rate_burst = forms.IntegerField(required=False, min_value=1, label="Burst")
    retention_days = forms.IntegerField(
        required=False, min_value=0,
        help_text="Empty: the gateway's default (GATEWAY_RETENTION_DAYS); 0: forever")
    retention_messages = forms.IntegerField(
        required=False, min_value=0,
        help_text="Keep the newest this many. Empty: the gateway's default; 0: all")
    notices = forms.BooleanField(required=False,
                                 label="Announce Telegram chats and devices that come and go")
    commands = forms.MultipleChoiceField(
        required=False, widget=forms.CheckboxSelectMultiple,
        label="The protocols that may send the room's devices commands",
        help_text="None ticked: every protocol that may post")
    commands_staff_only = forms.BooleanField(
        required=False, label="Only staff may send commands",
        help_text="Tick no protocol above")

    class Meta:
        model = Room
        fields: list[str] = []

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        senders = {p for adapter in adapters_all().values() for p in adapter.sender_protocols}
        self.fields["post"].choices = _choices(senders)
        self.fields["commands"].choices = _choices(senders)
        self.fields["receive"].choices = _choices(adapters_all())
        if self.instance.pk is not None:
            current = services.room_policy_get(room=self.instance.name)
            public = current.public() if current is not None else {}
            self.initial.update(
                post_all=public.get("post") is None, post=public.get("post") or [],
                receive_all=public.get("receive") is None,
                receive=public.get("receive") or [],
                name_format=public.get("name_format") or {},
                rate_per_second=(public.get("rate_limit") or {}).get("per_second"),
                rate_burst=(public.get("rate_limit") or {}).get("burst"),
                retention_days=public["retention"]["days"] if public else None,
                retention_messages=public["retention"]["messages"] if public else None,
                notices=public.get("notices", False),
                commands=public.get("commands") or [],
                commands_staff_only=public.get("commands") == [])

    def policy_data(self) -> dict:
        data = self.cleaned_data
        rate = None if data.get("rate_per_second") is None else {
            "per_second": data["rate_per_second"],
            **({"burst": data["rate_burst"]} if data.get("rate_burst") else {})}
        return {
            "post": None if data.get("post_all") else list(data.get("post") or []),
            "receive": None if data.get("receive_all") else list(data.get("receive") or []),
            "name_format": data.get("name_format") or {},
            "rate_limit": rate,
            "retention": {"days": data.get("retention_days"),
                          "messages": data.get("retention_messages")},
            "notices": bool(data.get("notices")),
            # none ticked: every protocol that may post; "only staff" keeps an empty list
            "commands": [] if data.get("commands_staff_only") else (
                list(data.get("commands") or []) or None),
        }

    def clean(self):
        cleaned = super().clean()
        if cleaned.get("commands_staff_only") and cleaned.get("commands"):
            raise forms.ValidationError("Commands: tick protocols, or 'only staff', not both.")
        if self.instance.pk is not None and not self.errors:
            current = services.room_policy_get(room=self.instance.name)
            senders = {p for a in adapters_all().values() for p in a.sender_protocols}
            try:
                self.policy = policy_update(current or services.Policy(), self.policy_data(),
                                            senders=senders, targets=set(adapters_all()))
            except GatewayError as exc:
                raise forms.ValidationError(exc.detail) from None
        return cleaned


@admin.register(Room)
class RoomAdmin(admin.ModelAdmin):
    list_display = ["name", "members_now", "last_seq", "last_activity", "closed", "policy_summary"]
    list_filter = ["closed"]
    search_fields = ["name"]
    ordering = ["-last_activity"]
    form = RoomPolicyForm
    readonly_fields = ["name", "last_seq", "last_activity", "created_at", "closed",
                       "first_available"]
    fieldsets = [
        (None, {"fields": ["name", "last_seq", "first_available", "last_activity",
                           "created_at", "closed"]}),
        ("Policy (applied live to every protocol)", {"fields": [
            "post_all", "post", "receive_all", "receive", "name_format", "rate_per_second",
            "rate_burst", "retention_days", "retention_messages", "notices", "commands",
            "commands_staff_only"]}),
    ]
    actions = ["close_rooms", "reopen_rooms"]

    @admin.display(description="first available cursor (retention)")
    def first_available(self, room: Room) -> int:
        return room.horizon + 1

    @admin.display(description="policy")
    def policy_summary(self, room: Room) -> str:
        public = services.room_policy_get(room=room.name)
        if public is None:
            return ""
        shown = public.public()
        parts = []
        if shown["post"] is not None:
            parts.append("posts: " + (", ".join(shown["post"]) or "staff only"))
        if shown["receive"] is not None:
            parts.append("reaches: " + (", ".join(shown["receive"]) or "nobody"))
        if shown["rate_limit"]:
            parts.append(f"{shown['rate_limit']['per_second']:g}/s")
        retention = shown["retention"]
        if retention["days"] or retention["messages"]:
            parts.append(f"keeps {retention['days'] or '∞'} days / "
                         f"{retention['messages'] or '∞'} messages")
        if shown["notices"]:
            parts.append("notices")
        if shown["commands"] is not None:
            parts.append("commands: " + (", ".join(shown["commands"]) or "staff only"))
        return "; ".join(parts)

    def save_model(self, request: HttpRequest, obj: Room, form, change: bool) -> None:
        services.room_policy_set(room=obj.name, policy=form.policy,
                                 by=services.staff_sender(request.user))

    @admin.display(description="members now")
    def members_now(self, room: Room) -> int:
        return _members_by_room().get(room.name, 0)

    @admin.action(description="Close the selected rooms (disconnects their members)")
    def close_rooms(self, request: HttpRequest, queryset: QuerySet) -> None:
        for room in queryset:
            services.room_close(room=room.name, by=services.staff_sender(request.user))
        self.message_user(request, f"Closed {queryset.count()} room(s).", messages.SUCCESS)

    @admin.action(description="Reopen the selected rooms")
    def reopen_rooms(self, request: HttpRequest, queryset: QuerySet) -> None:
        for room in queryset:
            services.room_reopen(room=room.name, by=services.staff_sender(request.user))
        self.message_user(request, f"Reopened {queryset.count()} room(s).", messages.SUCCESS)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # rooms open when someone joins them

    def has_delete_permission(self, request: HttpRequest, obj: Room | None = None) -> bool:
        return False  # ids must stay monotonic: close a room, delete its messages


class MessageRevisionInline(admin.TabularInline):
    """The edit history: each text an edit replaced, when, and by whom (staff only: the API
    and the sockets have the current text alone)."""

    model = MessageRevision
    verbose_name = "replaced text"
    verbose_name_plural = "edit history (texts replaced by edits, oldest first)"
    fields = ["replaced_at", "text", "by_name", "by_protocol", "by_id"]
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request: HttpRequest, obj: Message | None = None) -> bool:
        return False


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):
    list_display = ["room", "seq", "sender_name", "sender_protocol", "excerpt", "files",
                    "created_at", "edited_at", "deleted_at"]
    list_filter = ["sender_protocol", "created_at", ("deleted_at", admin.EmptyFieldListFilter),
                   ("edited_at", admin.EmptyFieldListFilter),
                   ("room", admin.RelatedOnlyFieldListFilter)]
    inlines = [MessageRevisionInline]
    search_fields = ["text", "sender_name"]
    date_hierarchy = "created_at"
    list_select_related = ["room"]
    readonly_fields = [f.name for f in Message._meta.fields]

    @admin.display(description="text")
    def excerpt(self, message: Message) -> str:
        return message.text if len(message.text) <= 80 else message.text[:79] + "…"

    @admin.display(description="files")
    def files(self, message: Message) -> str:
        return ", ".join(item["name"] for item in message.attachments or []) or "-"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Message | None = None) -> bool:
        return False  # history is not edited; it can be deleted

    def delete_model(self, request: HttpRequest, obj: Message) -> None:
        services.messages_delete(messages=[(obj.room.name, obj.seq)],
                                 by=services.staff_sender(request.user))

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet) -> None:
        services.messages_delete(messages=list(queryset.values_list("room__name", "seq")),
                                 by=services.staff_sender(request.user))


@admin.register(Device)
class DeviceAdmin(admin.ModelAdmin):
    """Blocking a device drops its messages and refuses its commands; turning ``commands``
    off refuses commands alone (both read when a command is sent: no cache to refresh)."""

    list_display = ["device_id", "protocol", "last_seen", "room_list", "blocked", "commands"]
    list_editable = ["blocked", "commands"]
    list_filter = ["blocked", "commands", "protocol"]
    search_fields = ["device_id"]
    readonly_fields = ["device_id", "protocol", "first_seen", "last_seen", "rooms"]
    fields = ["device_id", "protocol", "first_seen", "last_seen", "rooms", "blocked",
              "commands"]

    @admin.display(description="rooms")
    def room_list(self, device: Device) -> str:
        return ", ".join(device.rooms)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # devices appear when they publish


def _excerpt(value: object, size: int = 80) -> str:
    text = "" if value is None else value if isinstance(value, str) else json.dumps(
        value, ensure_ascii=False, separators=(",", ":"))
    return text if len(text) <= size else text[:size - 1] + "…"


class ReadOnlyAdmin(admin.ModelAdmin):
    """Rows the gateway writes (through its services): staff look, never add or change."""

    def get_readonly_fields(self, request: HttpRequest, obj=None):
        return [f.name for f in self.model._meta.fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False


@admin.register(DeviceRoom)
class DeviceRoomAdmin(ReadOnlyAdmin):
    """Devices as members of rooms: the status and last state each published there (written
    by the MQTT lease holder; a change is broadcast, so it is not edited or deleted here)."""

    list_display = ["room", "device_id", "status", "status_at", "state_excerpt", "seen_at"]
    list_filter = ["status"]
    search_fields = ["device_id", "room"]

    @admin.display(description="state")
    def state_excerpt(self, row: DeviceRoom) -> str:
        return _excerpt(row.state)

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        return False


@admin.register(DeviceCommand)
class DeviceCommandAdmin(ReadOnlyAdmin):
    """Commands sent to devices, and how each ended (answered, or expired without an
    answer). Deleting a pending one drops its answer and its timeout notice."""

    list_display = ["room", "device_id", "command_excerpt", "sender_name", "state",
                    "created_at", "deadline", "sent_at"]
    list_filter = ["state"]
    search_fields = ["device_id", "room", "command"]
    date_hierarchy = "created_at"

    @admin.display(description="command")
    def command_excerpt(self, row: DeviceCommand) -> str:
        return _excerpt(row.command)

    @admin.display(description="sender")
    def sender_name(self, row: DeviceCommand) -> str:
        sender = row.sender if isinstance(row.sender, dict) else {}
        return f"{sender.get('name', '?')} ({sender.get('protocol', '?')})"


@admin.register(BotChat)
class BotChatAdmin(admin.ModelAdmin):
    list_display = ["title", "platform", "chat_id", "kind", "room", "blocked"]
    list_editable = ["blocked"]
    list_filter = ["platform", "kind", "blocked"]
    search_fields = ["title", "chat_id", "room"]
    # The room changes only through /join and /leave (which place the delivery position).
    readonly_fields = ["platform", "chat_id", "kind", "title", "room", "sent_up_to", "names",
                       "created_at"]

    @admin.display(description="sent up to (the relay's position in the room)")
    def sent_up_to(self, chat: BotChat) -> int | None:
        return selectors.relay_position(relay=chat.platform, room=chat.room, target=chat.chat_id)

    def save_model(self, request: HttpRequest, obj: BotChat, form, change: bool) -> None:
        # Blocking goes through its service: a blocked chat is sent nothing, and one that is
        # unblocked gets its room from then on, not what was said meanwhile.
        if change and "blocked" in form.changed_data:
            chats.bot_chat_block(chat=obj, blocked=obj.blocked)
        else:
            super().save_model(request, obj, form, change)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # chats appear when they write to the bot


class ApiKeyForm(forms.ModelForm):
    scopes = forms.MultipleChoiceField(choices=_choices(ApiKey.SCOPES),
                                       widget=forms.CheckboxSelectMultiple, initial=["read"])
    rooms = forms.CharField(required=False, help_text="Room names or patterns (* and ?), "
                            "comma-separated; empty: every room")

    class Meta:
        model = ApiKey
        fields = ["name"]


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    """Keys for the HTTP API: made here (the key is shown once, in the message that
    follows), revoked here; never shown again (only its digest is kept)."""

    list_display = ["name", "prefix", "scope_list", "room_list", "created_at", "last_used_at",
                    "revoked_at"]
    list_filter = [("revoked_at", admin.EmptyFieldListFilter)]
    search_fields = ["name", "prefix"]
    actions = ["revoke"]

    def get_form(self, request, obj=None, change=False, **kwargs):
        if obj is None:
            kwargs["form"] = ApiKeyForm
        return super().get_form(request, obj, change=change, **kwargs)

    def get_fields(self, request, obj=None):
        if obj is None:
            return ["name", "scopes", "rooms"]
        return ["name", "prefix", "scopes", "rooms", "created_at", "created_by",
                "last_used_at", "revoked_at"]

    def get_readonly_fields(self, request, obj=None):
        return [] if obj is None else self.get_fields(request, obj)

    @admin.display(description="scopes")
    def scope_list(self, key: ApiKey) -> str:
        return ", ".join(key.scopes)

    @admin.display(description="rooms")
    def room_list(self, key: ApiKey) -> str:
        return ", ".join(key.rooms) or "all"

    def save_model(self, request: HttpRequest, obj: ApiKey, form, change: bool) -> None:
        if change:
            return  # a key does not change: revoke it and make another
        try:
            record, key = access.api_key_create(
                name=form.cleaned_data["name"], scopes=form.cleaned_data["scopes"],
                rooms=form.cleaned_data["rooms"], created_by=request.user.get_username())
        except GatewayError as exc:
            self.message_user(request, f"No key made: {exc.detail}", messages.ERROR)
            return
        obj.pk = record.pk
        self.message_user(request, f"API key {record.prefix} for {record.name}: {key} — copy "
                          "it now, it is not shown again.", messages.WARNING)

    def response_add(self, request, obj, post_url_continue=None):
        return self.response_post_save_add(request, obj)

    @admin.action(description="Revoke the selected keys (refused from now on)")
    def revoke(self, request: HttpRequest, queryset: QuerySet) -> None:
        count = sum(access.api_key_revoke(prefix=prefix)
                    for prefix in queryset.values_list("prefix", flat=True))
        self.message_user(request, f"Revoked {count} key(s).", messages.SUCCESS)

    def has_delete_permission(self, request: HttpRequest, obj: ApiKey | None = None) -> bool:
        return False  # revoked, not deleted: what it did keeps its sender


@admin.register(SenderBlock)
class SenderBlockAdmin(admin.ModelAdmin):
    list_display = ["protocol", "kind", "value", "note", "created_at"]
    list_filter = ["protocol", "kind"]
    search_fields = ["value", "note"]

    def formfield_for_dbfield(self, db_field, request, **kwargs):
        if db_field.name == "protocol":  # the sender protocols of the configured adapters
            kwargs["widget"] = forms.Select(choices=[(p, p) for p in sorted(events.PROTOCOLS)])
        return super().formfield_for_dbfield(db_field, request, **kwargs)


from gateway import admin_webhooks  # noqa: E402, F401  (registers the webhook admin)


@admin.register(Attachment)
class AttachmentAdmin(admin.ModelAdmin):
    """Files as the gateway keeps them (read only: they go with their message; delete the
    message to remove them)."""

    list_display = ["name", "room", "seq", "content_type", "size", "state", "sender_protocol",
                    "created_at"]
    list_filter = ["state", "content_type", "sender_protocol"]
    search_fields = ["name", "room", "key"]
    date_hierarchy = "created_at"
    readonly_fields = [f.name for f in Attachment._meta.fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Attachment | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Attachment | None = None) -> bool:
        return False
