-- Seed data for three tenants. Idempotent: re-running `pgward dev --upstream` keeps one copy.
-- The encrypted columns (customers.email, customers.ssn, invoices.card_number) are left NULL
-- here: plaintext must never reach the database, so `pgward dev` fills them with ciphertext
-- through the crypto library (`cli::dev::seed_encrypted_demo`).
INSERT INTO tenants (id, name) VALUES
    (1, 'Acme Corp'), (2, 'Globex'), (3, 'Initech')
ON CONFLICT (id) DO NOTHING;

INSERT INTO customers (tenant_id, name)
SELECT t.id, format('Customer %s-%s', t.id, n)
FROM tenants t, generate_series(1, 5) AS n
WHERE NOT EXISTS (SELECT 1 FROM customers);

INSERT INTO invoices (tenant_id, customer_id, amount_cents, status, issued_at)
SELECT c.tenant_id, c.id, 1000 * c.id + 99,
       CASE WHEN c.id % 2 = 0 THEN 'paid' ELSE 'open' END,
       DATE '2026-01-01' + (c.id::int % 28)
FROM customers c
WHERE NOT EXISTS (SELECT 1 FROM invoices);
