-- Demo multi-tenant schema loaded by `pgward dev` (and by the integration tests).
-- customers.email, customers.ssn and invoices.card_number are encrypted by pgward (field
-- encryption, see the [[encrypt]] entries `pgward dev` writes): the database stores AES-GCM
-- envelopes (bytea) and, for the searchable email and card_number, a blind index in
-- `<column>_bidx`. Services connected through pgward read and write them as text.
CREATE TABLE IF NOT EXISTS tenants (
    id   bigint PRIMARY KEY,
    name text NOT NULL
);

CREATE TABLE IF NOT EXISTS customers (
    id         bigserial PRIMARY KEY,
    tenant_id  bigint NOT NULL REFERENCES tenants,
    name       text,
    email      bytea,
    email_bidx bytea,
    ssn        bytea,
    created_at timestamptz DEFAULT now()
);
CREATE INDEX IF NOT EXISTS customers_tenant_id_idx ON customers (tenant_id);
CREATE INDEX IF NOT EXISTS customers_email_bidx_idx ON customers (email_bidx);

CREATE TABLE IF NOT EXISTS invoices (
    id               bigserial PRIMARY KEY,
    tenant_id        bigint NOT NULL REFERENCES tenants,
    customer_id      bigint REFERENCES customers,
    amount_cents     bigint NOT NULL,
    card_number      bytea,
    card_number_bidx bytea,
    status           text,
    issued_at        date
);
CREATE INDEX IF NOT EXISTS invoices_tenant_id_idx ON invoices (tenant_id);
CREATE INDEX IF NOT EXISTS invoices_card_number_bidx_idx ON invoices (card_number_bidx);
