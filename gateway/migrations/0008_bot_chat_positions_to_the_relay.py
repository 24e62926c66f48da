# How far each bot chat has been sent its room moves from BotChat.delivered_seq to the
# relay's positions (RelayCursor, relay = the chat's platform, target = its chat id).

from django.db import migrations


def positions_to_the_relay(apps, schema_editor):
    BotChat = apps.get_model("gateway", "BotChat")
    RelayCursor = apps.get_model("gateway", "RelayCursor")
    chats = BotChat.objects.exclude(room="").filter(blocked=False)
    RelayCursor.objects.bulk_create(
        [RelayCursor(relay=platform, room=room, target=chat_id, last_seq=seq)
         for platform, room, chat_id, seq in
         chats.values_list("platform", "room", "chat_id", "delivered_seq")],
        ignore_conflicts=True, batch_size=500,
    )


def positions_to_the_chats(apps, schema_editor):
    BotChat = apps.get_model("gateway", "BotChat")
    RelayCursor = apps.get_model("gateway", "RelayCursor")
    for chat in BotChat.objects.exclude(room=""):
        seq = RelayCursor.objects.filter(relay=chat.platform, room=chat.room,
                                         target=chat.chat_id).values_list("last_seq", flat=True)
        chat.delivered_seq = seq.first() or 0
        chat.save(update_fields=["delivered_seq"])
    # Back to one position per relay and room (0007 reversed): only MQTT's rows stay.
    RelayCursor.objects.exclude(target="").delete()


class Migration(migrations.Migration):

    dependencies = [
        ('gateway', '0007_relay_targets'),
    ]

    operations = [
        migrations.RunPython(positions_to_the_relay, positions_to_the_chats),
        migrations.RemoveField(
            model_name='botchat',
            name='delivered_seq',
        ),
    ]
