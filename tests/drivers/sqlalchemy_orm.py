"""SQLAlchemy 2 ORM on the demo models through pgward as a policy-bound service (billing),
over TLS with psycopg 3: reflection, filters, joins, aggregates, pagination, bulk inserts,
upserts and updates must all run without a refusal, and see only the tenant's rows.

Run by tests/it/catalog.rs with PGWARD_DSN set (postgresql+psycopg URL); exits non-zero on
the first failed check. Skipped (exit 0, "skipped") when SQLAlchemy is not installed.
"""
import os
import sys

try:
    import sqlalchemy as sa
    from sqlalchemy.dialects.postgresql import insert as pg_insert
    from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
except ImportError:
    print("skipped: SQLAlchemy not installed")
    sys.exit(0)


def check(condition, what):
    if not condition:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)


class Base(DeclarativeBase):
    pass


# tenant_id is a policy preset (pgward sets it from the token and refuses a client value):
# mapped as server-generated, so the ORM never writes it.
class Customer(Base):
    __tablename__ = "customers"
    id: Mapped[int] = mapped_column(sa.BigInteger, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(sa.BigInteger, server_default=sa.FetchedValue())
    name: Mapped[str | None]
    email: Mapped[str | None]


class Invoice(Base):
    __tablename__ = "invoices"
    id: Mapped[int] = mapped_column(sa.BigInteger, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(sa.BigInteger, server_default=sa.FetchedValue())
    customer_id: Mapped[int | None] = mapped_column(sa.BigInteger, sa.ForeignKey("customers.id"))
    amount_cents: Mapped[int] = mapped_column(sa.BigInteger)
    status: Mapped[str | None]


engine = sa.create_engine(os.environ["PGWARD_DSN"])

# Reflection (the inspector's pg_catalog queries).
inspector = sa.inspect(engine)
tables = sorted(inspector.get_table_names())
check(tables == ["customers", "invoices"], f"reflected tables: {tables}")
cols = [c["name"] for c in inspector.get_columns("customers")]
check("name" in cols and "tenant_id" in cols, f"reflected columns: {cols}")
check(inspector.get_pk_constraint("customers")["constrained_columns"] == ["id"], "primary key")
fks = inspector.get_foreign_keys("invoices")
check(any(fk["referred_table"] == "customers" for fk in fks), f"foreign keys: {fks}")
inspector.get_indexes("customers")

with Session(engine) as s:
    # Filters, pagination.
    everyone = s.scalars(sa.select(Customer).order_by(Customer.id)).all()
    check(len(everyone) == 5 and all(c.tenant_id == 1 for c in everyone), "tenant's customers")
    page = s.scalars(sa.select(Customer).order_by(Customer.id).limit(2).offset(2)).all()
    check([c.id for c in page] == [c.id for c in everyone[2:4]], "pagination")
    named = s.scalars(sa.select(Customer).where(Customer.name.ilike("%"), Customer.id > 0)).all()
    check(len(named) == 5, "ilike filter")
    # Joins and aggregates.
    rows = s.execute(
        sa.select(Customer.name, sa.func.count(Invoice.id), sa.func.sum(Invoice.amount_cents))
        .join(Invoice, Invoice.customer_id == Customer.id)
        .group_by(Customer.name)
        .having(sa.func.count(Invoice.id) > 0)
        .order_by(Customer.name)
    ).all()
    check(len(rows) > 0, "join + aggregate")
    # Bulk insert (insertmanyvalues), tenant preset by the policy.
    s.add_all([Customer(name=f"orm {i}", email=f"orm{i}@x") for i in range(3)])
    s.flush()
    s.commit()
    added = s.scalars(sa.select(Customer).where(Customer.name.like("orm %"))).all()
    check(len(added) == 3 and all(c.tenant_id == 1 for c in added), "bulk insert")
    # Update through the unit of work.
    added[0].name = "orm renamed"
    s.commit()
    # Upsert.
    stmt = pg_insert(Customer).values(id=added[1].id, name="orm upserted")
    stmt = stmt.on_conflict_do_update(index_elements=["id"], set_={"name": stmt.excluded.name})
    s.execute(stmt)
    s.commit()
    check(s.get(Customer, added[1].id).name == "orm upserted", "upsert")
    # Core bulk insert with executemany.
    s.execute(sa.insert(Invoice), [
        {"customer_id": added[2].id, "amount_cents": 100 + i, "status": "open"} for i in range(3)
    ])
    s.commit()
    n = s.scalar(sa.select(sa.func.count()).select_from(Invoice).where(Invoice.status == "open"))
    check(n >= 3, "executemany insert")
print("all checks passed")
