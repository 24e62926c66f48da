"""Django admin for staff: rooms, messages, devices, bot chats and blocked senders.

Changes with an effect on live connections go through the services (deleting a message
removes it from open pages too; closing a room disconnects its members), never straight to
the ORM.
"""

from __future__ import annotations

import time

from django import forms
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from gateway import chats, events, selectors, services
from gateway.models import BotChat, Device, Message, MessageRevision, Room, SenderBlock

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


@admin.register(Room)
class RoomAdmin(admin.ModelAdmin):
    list_display = ["name", "members_now", "last_seq", "last_activity", "closed"]
    list_filter = ["closed"]
    search_fields = ["name"]
    ordering = ["-last_activity"]
    readonly_fields = ["name", "last_seq", "last_activity", "created_at", "closed"]
    actions = ["close_rooms", "reopen_rooms"]

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
    list_display = ["room", "seq", "sender_name", "sender_protocol", "excerpt", "created_at",
                    "edited_at", "deleted_at"]
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
    list_display = ["device_id", "protocol", "last_seen", "room_list", "blocked"]
    list_editable = ["blocked"]
    list_filter = ["blocked"]
    search_fields = ["device_id"]
    readonly_fields = ["device_id", "protocol", "first_seen", "last_seen", "rooms"]

    @admin.display(description="rooms")
    def room_list(self, device: Device) -> str:
        return ", ".join(device.rooms)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # devices appear when they publish


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


@admin.register(SenderBlock)
class SenderBlockAdmin(admin.ModelAdmin):
    list_display = ["protocol", "kind", "value", "note", "created_at"]
    list_filter = ["protocol", "kind"]
    search_fields = ["value", "note"]

    def formfield_for_dbfield(self, db_field, request, **kwargs):
        if db_field.name == "protocol":  # the sender protocols of the configured adapters
            kwargs["widget"] = forms.Select(choices=[(p, p) for p in sorted(events.PROTOCOLS)])
        return super().formfield_for_dbfield(db_field, request, **kwargs)
