from django.conf import settings
from django.db import models


class TenantRole(models.Model):
    """The IAM role a user's requests assume, and the S3 bucket that role may read."""

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="tenant_role"
    )
    role_arn = models.CharField(max_length=2048)
    bucket = models.CharField(max_length=63)

    def __str__(self) -> str:
        return f"{self.user} -> {self.role_arn}"
