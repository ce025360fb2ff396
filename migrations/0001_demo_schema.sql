-- Demo multi-tenant schema loaded by `pgward dev` (and by the integration tests).
-- The encryption issue later stores email, ssn and card_number encrypted; the column names stay.
CREATE TABLE IF NOT EXISTS tenants (
    id   bigint PRIMARY KEY,
    name text NOT NULL
);

CREATE TABLE IF NOT EXISTS customers (
    id         bigserial PRIMARY KEY,
    tenant_id  bigint NOT NULL REFERENCES tenants,
    name       text,
    email      text,
    ssn        text,
    created_at timestamptz DEFAULT now()
);
CREATE INDEX IF NOT EXISTS customers_tenant_id_idx ON customers (tenant_id);

CREATE TABLE IF NOT EXISTS invoices (
    id           bigserial PRIMARY KEY,
    tenant_id    bigint NOT NULL REFERENCES tenants,
    customer_id  bigint REFERENCES customers,
    amount_cents bigint NOT NULL,
    card_number  text,
    status       text,
    issued_at    date
);
CREATE INDEX IF NOT EXISTS invoices_tenant_id_idx ON invoices (tenant_id);
