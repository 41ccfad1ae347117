"""Views: the request's credentials via stscreds.django, S3 via stscreds.aws."""

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from examples.django_project.tenants.models import TenantRole
from stscreds.aws import client
from stscreds.django import get_credentials


def whoami(request: HttpRequest) -> JsonResponse:
    credentials = get_credentials(request)  # 403 for a request without a role
    return JsonResponse(
        {
            "access_key_id_tail": credentials.access_key_id[-4:],
            "expiration": credentials.expiration.isoformat(),
        }
    )


def objects(request: HttpRequest) -> JsonResponse:
    credentials = get_credentials(request)
    tenant = TenantRole.objects.get(user__username=request.headers["X-User"])
    s3 = client(
        credentials,
        "s3",
        region=settings.STSCREDS["REGION"],
        endpoint_url=settings.S3_ENDPOINT_URL,
    )
    listed = s3.list_objects_v2(Bucket=tenant.bucket)
    keys = [item["Key"] for item in listed.get("Contents", [])]
    return JsonResponse({"bucket": tenant.bucket, "keys": keys})


def metrics(request: HttpRequest) -> HttpResponse:
    """Every metric of the default registry, stscreds_* included (Prometheus text format);
    asgi.py and wsgi.py register the broker's collector."""
    return HttpResponse(generate_latest(REGISTRY), content_type=CONTENT_TYPE_LATEST)
