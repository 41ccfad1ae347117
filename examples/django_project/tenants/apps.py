from django.apps import AppConfig


class TenantsConfig(AppConfig):
    name = "examples.django_project.tenants"
    default_auto_field = "django.db.models.BigAutoField"
