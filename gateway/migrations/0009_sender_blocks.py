# Blocks become protocol-neutral: WebBlock is SenderBlock with the sender's protocol (the
# existing rows are the web's), and a device records its protocol (the existing ones are
# MQTT's), so the store's block check names no protocol.

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('gateway', '0008_bot_chat_positions_to_the_relay'),
    ]

    operations = [
        migrations.RemoveConstraint(
            model_name='webblock',
            name='web_block_unique',
        ),
        migrations.RenameModel(
            old_name='WebBlock',
            new_name='SenderBlock',
        ),
        migrations.AddField(
            model_name='senderblock',
            name='protocol',
            field=models.CharField(default='web', help_text="The sender's protocol", max_length=16),
            preserve_default=False,
        ),
        migrations.AddConstraint(
            model_name='senderblock',
            constraint=models.UniqueConstraint(fields=('protocol', 'kind', 'value'), name='sender_block_unique'),
        ),
        migrations.AddField(
            model_name='device',
            name='protocol',
            field=models.CharField(default='mqtt', help_text='Its sender protocol (mqtt)', max_length=16),
            preserve_default=False,
        ),
    ]
