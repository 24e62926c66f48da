"""``gateway manage apikey``: API keys for other programs (gateway/access.py).

    gateway manage apikey create --name N [--rooms PATTERN[,PATTERN...]] [--scopes read,post,manage]
    gateway manage apikey list
    gateway manage apikey revoke PREFIX

``create`` prints the new key alone on its last line (for ``| tail -1``): it is shown once,
only its digest is kept.
"""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError, CommandParser

from gateway import access
from gateway.errors import GatewayError
from gateway.models import ApiKey


class Command(BaseCommand):
    help = "Create, list and revoke API keys for the HTTP API"

    def add_arguments(self, parser: CommandParser) -> None:
        commands = parser.add_subparsers(dest="action", required=True)
        create = commands.add_parser("create", help="make a key (printed once, last line)")
        create.add_argument("--name", required=True, help="shown as the sender of its posts")
        create.add_argument("--rooms", default="",
                            help="room names or patterns (* and ?), comma-separated; "
                                 "default: every room")
        create.add_argument("--scopes", default="read,post",
                            help="some of read,post,manage (default: read,post)")
        commands.add_parser("list", help="the keys (never the keys themselves)")
        revoke = commands.add_parser("revoke", help="refuse a key from now on")
        revoke.add_argument("prefix", help="the key's prefix, as `list` shows it")

    def handle(self, *args: object, **options: object) -> None:
        action = options["action"]
        if action == "create":
            try:
                record, key = access.api_key_create(
                    name=str(options["name"]), scopes=options["scopes"],
                    rooms=options["rooms"], created_by="command line")
            except GatewayError as exc:
                raise CommandError(exc.detail) from None
            self.stdout.write(f"Created API key {record.prefix} ({record.name}): scopes "
                              f"{','.join(record.scopes)}; rooms "
                              f"{','.join(record.rooms) or 'all'}. It is shown only now:")
            self.stdout.write(key)
        elif action == "list":
            for record in ApiKey.objects.all():
                state = "revoked" if record.revoked_at else "active"
                used = record.last_used_at.isoformat() if record.last_used_at else "never"
                self.stdout.write(f"{record.prefix}  {record.name}  {','.join(record.scopes)}  "
                                  f"rooms={','.join(record.rooms) or 'all'}  {state}  "
                                  f"last used {used}")
        elif action == "revoke":
            if not access.api_key_revoke(prefix=str(options["prefix"])):
                raise CommandError(f"no active key with prefix {options['prefix']}")
            self.stdout.write(f"Revoked {options['prefix']}.")
