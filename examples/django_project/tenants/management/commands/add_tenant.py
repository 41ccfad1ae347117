"""``manage.py add_tenant USERNAME ROLE_ARN BUCKET``: give a user (made if new) a role."""

from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandParser

from examples.django_project.tenants.models import TenantRole


class Command(BaseCommand):
    help = "Give USERNAME (created if missing) the IAM role ROLE_ARN and the bucket BUCKET."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")
        parser.add_argument("role_arn")
        parser.add_argument("bucket")

    def handle(self, *args: Any, **options: Any) -> None:
        user, _ = get_user_model().objects.get_or_create(username=options["username"])
        TenantRole.objects.update_or_create(
            user=user, defaults={"role_arn": options["role_arn"], "bucket": options["bucket"]}
        )
        self.stdout.write(f"{user.username} -> {options['role_arn']} ({options['bucket']})")
