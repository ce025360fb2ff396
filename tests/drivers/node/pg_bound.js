// node-postgres through pgward over TLS as a policy-bound service: schema reflection as ORMs
// built on it do (information_schema, pg_catalog), filtered rows, parameters.
// Run by tests/it/catalog.rs with PGWARD_PORT, PGWARD_TOKEN, PGWARD_DATABASE and PGWARD_USER set.
'use strict';
const { Client } = require('pg');

function check(condition, what) {
  if (!condition) {
    console.error(`FAILED: ${what}`);
    process.exit(1);
  }
}

async function main() {
  const client = new Client({
    host: '127.0.0.1',
    port: Number(process.env.PGWARD_PORT),
    user: process.env.PGWARD_USER,
    password: process.env.PGWARD_TOKEN,
    database: process.env.PGWARD_DATABASE,
    ssl: { rejectUnauthorized: false }, // the test certificate is self-signed
  });
  await client.connect();
  let r = await client.query(
    "select table_name from information_schema.tables where table_schema = 'public' order by 1");
  check(r.rows.map((x) => x.table_name).join() === 'customers,invoices', `tables: ${JSON.stringify(r.rows)}`);
  r = await client.query(
    `select a.attname, format_type(a.atttypid, a.atttypmod) as type
       from pg_attribute a join pg_class c on c.oid = a.attrelid
      where c.relname = $1 and a.attnum > 0 and not a.attisdropped order by a.attnum`, ['customers']);
  check(r.rows.length >= 4, `columns: ${JSON.stringify(r.rows)}`);
  r = await client.query('select distinct tenant_id from customers where id > $1', [0]);
  check(r.rows.length === 1 && String(r.rows[0].tenant_id) === '1', `rows: ${JSON.stringify(r.rows)}`);
  r = await client.query("select typname, oid from pg_type where typname = any($1)", [['int4', 'text']]);
  check(r.rows.length === 2, 'type lookup');
  await client.end();
  console.log('all checks passed');
}

main().catch((e) => {
  console.error(`FAILED: ${e.message}`);
  process.exit(1);
});
