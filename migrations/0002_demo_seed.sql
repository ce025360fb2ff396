-- Seed data for three tenants. Idempotent: re-running `pgward dev --upstream` keeps one copy.
INSERT INTO tenants (id, name) VALUES
    (1, 'Acme Corp'), (2, 'Globex'), (3, 'Initech')
ON CONFLICT (id) DO NOTHING;

INSERT INTO customers (tenant_id, name, email, ssn)
SELECT t.id,
       format('Customer %s-%s', t.id, n),
       format('customer%s@tenant%s.example', n, t.id),
       format('%s-%s-%s', lpad((100 + t.id)::text, 3, '0'), lpad(n::text, 2, '0'), lpad((1000 + n * t.id)::text, 4, '0'))
FROM tenants t, generate_series(1, 5) AS n
WHERE NOT EXISTS (SELECT 1 FROM customers);

INSERT INTO invoices (tenant_id, customer_id, amount_cents, card_number, status, issued_at)
SELECT c.tenant_id, c.id, 1000 * c.id + 99,
       format('4111-1111-1111-%s', lpad(c.id::text, 4, '0')),
       CASE WHEN c.id % 2 = 0 THEN 'paid' ELSE 'open' END,
       DATE '2026-01-01' + (c.id::int % 28)
FROM customers c
WHERE NOT EXISTS (SELECT 1 FROM invoices);
