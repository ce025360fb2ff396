// node-postgres through pgward over TLS: simple and extended queries, a named prepared
// statement, a transaction with a failing statement, type parsing, and a pool.
// Run by tests/it/tools.rs with PGWARD_PORT, PGWARD_TOKEN and PGWARD_DATABASE set.
'use strict';
const { Client, Pool } = require('pg');

function check(condition, what) {
  if (!condition) {
    console.error(`FAILED: ${what}`);
    process.exit(1);
  }
}

const config = {
  host: '127.0.0.1',
  port: Number(process.env.PGWARD_PORT),
  user: 'app',
  password: process.env.PGWARD_TOKEN,
  database: process.env.PGWARD_DATABASE,
  ssl: { rejectUnauthorized: false }, // the test certificate is self-signed
};

async function main() {
  const client = new Client(config);
  await client.connect();
  // Simple protocol (no parameters).
  let r = await client.query("select 1 as one, 'héllo'::text as t");
  check(r.rows[0].one === 1 && r.rows[0].t === 'héllo', 'simple query');
  // Extended protocol (parameters).
  r = await client.query('select $1::int + $2::int as sum, $3::text[] as arr', [40, 2, ['a', 'b']]);
  check(r.rows[0].sum === 42 && r.rows[0].arr.join() === 'a,b', 'extended query');
  // A named prepared statement reused.
  for (let i = 0; i < 10; i++) {
    r = await client.query({ name: 'times3', text: 'select $1::int * 3 as v', values: [i] });
    check(r.rows[0].v === i * 3, `prepared ${i}`);
  }
  // A transaction with an error: the failing statement aborts it, ROLLBACK recovers.
  await client.query('create temp table drv(a int primary key)');
  await client.query('begin');
  await client.query('insert into drv values (1)');
  let failed = false;
  try {
    await client.query('insert into drv values (1)');
  } catch (e) {
    failed = e.code === '23505';
  }
  check(failed, 'unique violation reported');
  await client.query('rollback');
  r = await client.query('select count(*)::int as n from drv');
  check(r.rows[0].n === 0, 'rolled back');
  // Rows and row counts.
  r = await client.query('insert into drv select generate_series(1, 100)');
  check(r.rowCount === 100, 'rowCount');
  await client.end();
  // A pool of connections in parallel.
  const pool = new Pool({ ...config, max: 4 });
  const results = await Promise.all(
    Array.from({ length: 16 }, (_, i) => pool.query('select $1::int as i', [i])),
  );
  check(results.every((res, i) => res.rows[0].i === i), 'pool');
  await pool.end();
  console.log('all checks passed');
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
