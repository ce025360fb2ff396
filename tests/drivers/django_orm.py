"""Django ORM on the demo models through pgward as a policy-bound service (billing), over TLS
with psycopg 3: filters, joins, aggregates, pagination, bulk inserts, upserts and updates must
run without a refusal and see only the tenant's rows.

Run by tests/it/catalog.rs with PGWARD_PORT, PGWARD_TOKEN, PGWARD_DATABASE and PGWARD_USER set;
exits non-zero on the first failed check. Skipped (exit 0, "skipped") without Django.
"""
import os
import sys

try:
    import django
    from django.conf import settings
except ImportError:
    print("skipped: Django not installed")
    sys.exit(0)

settings.configure(
    DATABASES={
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "HOST": "127.0.0.1",
            "PORT": os.environ["PGWARD_PORT"],
            "NAME": os.environ["PGWARD_DATABASE"],
            "USER": os.environ["PGWARD_USER"],
            "PASSWORD": os.environ["PGWARD_TOKEN"],
            "OPTIONS": {"sslmode": "require"},
        }
    },
    INSTALLED_APPS=[],
    USE_TZ=True,
)
django.setup()

from django.db import models  # noqa: E402
from django.db.models import Count, Sum  # noqa: E402
from django.db.models.functions import Now  # noqa: E402


def check(condition, what):
    if not condition:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)


# tenant_id is a policy preset: left to the database (pgward sets it from the token).
class Customer(models.Model):
    id = models.BigAutoField(primary_key=True)
    tenant_id = models.BigIntegerField(db_default=0)
    name = models.TextField(null=True)
    email = models.TextField(null=True)
    created_at = models.DateTimeField(db_default=Now())

    class Meta:
        app_label = "demo"
        db_table = "customers"
        managed = False


class Invoice(models.Model):
    id = models.BigAutoField(primary_key=True)
    tenant_id = models.BigIntegerField(db_default=0)
    customer = models.ForeignKey(Customer, models.DO_NOTHING, null=True)
    amount_cents = models.BigIntegerField()
    status = models.TextField(null=True)

    class Meta:
        app_label = "demo"
        db_table = "invoices"
        managed = False


everyone = list(Customer.objects.order_by("id"))
check(len(everyone) == 5 and all(c.tenant_id == 1 for c in everyone), "tenant's customers")
page = list(Customer.objects.order_by("id")[2:4])
check([c.id for c in page] == [c.id for c in everyone[2:4]], "pagination")
check(Customer.objects.filter(name__icontains="", id__gt=0).count() == 5, "filters")
joined = list(Invoice.objects.select_related("customer").filter(customer__id__gt=0)[:5])
check(all(i.customer.tenant_id == 1 for i in joined), "join")
per = list(
    Invoice.objects.values("customer__name")
    .annotate(n=Count("id"), total=Sum("amount_cents"))
    .filter(n__gt=0)
    .order_by("customer__name")
)
check(len(per) > 0, "aggregates")
made = Customer.objects.bulk_create([Customer(name=f"dj {i}") for i in range(3)])
check(all(c.id is not None for c in made), "bulk insert returning ids")
Customer.objects.filter(id=made[0].id).update(name="dj renamed")
c = Customer.objects.get(id=made[1].id)
c.name = "dj saved"
c.save(update_fields=["name"])
Customer.objects.bulk_create(
    [Customer(id=made[2].id, name="dj upserted")],
    update_conflicts=True,
    unique_fields=["id"],
    update_fields=["name"],
)
check(Customer.objects.get(id=made[2].id).name == "dj upserted", "upsert")
check(Customer.objects.filter(name__startswith="dj").count() == 3, "writes visible")
print("all checks passed")
