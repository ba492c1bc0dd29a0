//! PostgreSQL backend (the `postgres` crate): a small pool of [`POOL`] connections, each reopened
//! if it drops; each change in one transaction at READ COMMITTED, where the conditional `UPDATE` of a token serialises racing
//! enrollments on the row lock. Called from blocking threads (`spawn_blocking`).
//!
//! Each connection keeps its prepared statements ([`Conn`]): a statement given as text costs a
//! round trip to prepare and one to run, so an enrollment batch (four statements per node) paid
//! twice the round trips before; a cached one is prepared once per connection.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use postgres::types::{ToSql, Type};
use postgres::{Client, NoTls, Statement};

use super::{Backend, DbError, RegistryError, Tx, Value};

/// Connections kept open.
pub const POOL: usize = 4;

/// Prepared statements kept per connection at most (the registry's statements are fixed
/// text, a few dozen; the cache starts over if that ever grows past this).
pub const STATEMENT_CACHE: usize = 256;

/// One pooled connection and its prepared statements, by SQL text.
struct Conn {
    client: Client,
    statements: HashMap<String, Statement>,
}

/// The PostgreSQL registry backend.
pub struct Postgres {
    url: String,
    clients: Vec<Mutex<Option<Conn>>>,
    next: std::sync::atomic::AtomicUsize,
}

impl Drop for Postgres {
    /// The sync client blocks on its own runtime when it closes: do that off any async thread.
    fn drop(&mut self) {
        let clients: Vec<Conn> = self
            .clients
            .iter_mut()
            .filter_map(|c| c.get_mut().unwrap_or_else(PoisonError::into_inner).take())
            .collect();
        if !clients.is_empty() {
            let _ = std::thread::spawn(move || drop(clients));
        }
    }
}

impl std::fmt::Debug for Postgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Postgres").finish_non_exhaustive()
    }
}

fn err(what: impl Into<String>) -> impl FnOnce(postgres::Error) -> DbError {
    let what = what.into();
    move |e| DbError { backend: "postgres", what, source: Box::new(e) }
}

impl Postgres {
    /// Connect to `url` (`postgres://user@host:port/db`, or `host=/socket/dir` forms).
    pub fn connect(url: &str) -> Result<Self, DbError> {
        let mut clients = Vec::with_capacity(POOL);
        for _ in 0..POOL {
            let client = Client::connect(url, NoTls).map_err(err("cannot connect"))?;
            clients.push(Mutex::new(Some(Conn { client, statements: HashMap::new() })));
        }
        Ok(Self { url: url.to_string(), clients, next: std::sync::atomic::AtomicUsize::new(0) })
    }
}

struct PgTx<'a, 'b> {
    tx: postgres::Transaction<'b>,
    statements: &'a mut HashMap<String, Statement>,
}

impl PgTx<'_, '_> {
    /// The prepared statement for `s`, prepared on this connection the first time.
    fn statement(&mut self, s: &str, what: &str) -> Result<Statement, DbError> {
        if let Some(st) = self.statements.get(s) {
            return Ok(st.clone());
        }
        let st = self.tx.prepare(s).map_err(err(what))?;
        if self.statements.len() >= STATEMENT_CACHE {
            self.statements.clear();
        }
        self.statements.insert(s.to_string(), st.clone());
        Ok(st)
    }
}

fn boxed(p: &[Value]) -> Vec<Box<dyn ToSql + Sync>> {
    p.iter()
        .map(|v| -> Box<dyn ToSql + Sync> {
            match v {
                Value::Int(i) => Box::new(*i),
                Value::Text(s) => Box::new(s.clone()),
            }
        })
        .collect()
}

impl Tx for PgTx<'_, '_> {
    fn exec(&mut self, s: &str, p: &[Value]) -> Result<u64, DbError> {
        let what = s.lines().next().unwrap_or_default().trim();
        let st = self.statement(s, what)?;
        let b = boxed(p);
        let refs: Vec<&(dyn ToSql + Sync)> = b.iter().map(|b| b.as_ref()).collect();
        self.tx.execute(&st, &refs).map_err(err(what))
    }

    fn query(&mut self, s: &str, p: &[Value]) -> Result<Vec<Vec<Value>>, DbError> {
        let what = s.lines().next().unwrap_or_default().trim().to_string();
        let st = self.statement(s, &what)?;
        let b = boxed(p);
        let refs: Vec<&(dyn ToSql + Sync)> = b.iter().map(|b| b.as_ref()).collect();
        let rows = self.tx.query(&st, &refs).map_err(err(what.clone()))?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let mut r = Vec::with_capacity(row.len());
            for (c, column) in row.columns().iter().enumerate() {
                let t = column.type_();
                r.push(if *t == Type::INT8 {
                    Value::Int(row.try_get::<_, Option<i64>>(c).map_err(err(what.clone()))?)
                } else if *t == Type::INT4 {
                    Value::Int(
                        row.try_get::<_, Option<i32>>(c).map_err(err(what.clone()))?.map(i64::from),
                    )
                } else {
                    Value::Text(row.try_get::<_, Option<String>>(c).map_err(err(what.clone()))?)
                });
            }
            out.push(r);
        }
        Ok(out)
    }
}

impl Backend for Postgres {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    fn serial_pk(&self) -> &'static str {
        "BIGSERIAL PRIMARY KEY"
    }

    fn transact(
        &self,
        f: &mut dyn FnMut(&mut dyn Tx) -> Result<(), RegistryError>,
    ) -> Result<(), RegistryError> {
        // A free connection if there is one, else wait for the next in turn.
        let start = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let n = self.clients.len();
        let mut guard =
            (0..n).find_map(|i| self.clients[(start + i) % n].try_lock().ok()).unwrap_or_else(
                || self.clients[start % n].lock().unwrap_or_else(PoisonError::into_inner),
            );
        if guard.as_ref().is_none_or(|c| c.client.is_closed()) {
            let client = Client::connect(&self.url, NoTls).map_err(err("cannot reconnect"))?;
            *guard = Some(Conn { client, statements: HashMap::new() });
        }
        let Some(conn) = guard.as_mut() else {
            return Err(DbError {
                backend: "postgres",
                what: "no connection".into(),
                source: "no connection".into(),
            }
            .into());
        };
        let tx = conn.client.transaction().map_err(err("BEGIN"))?;
        let mut pg = PgTx { tx, statements: &mut conn.statements };
        f(&mut pg)?;
        pg.tx.commit().map_err(err("COMMIT"))?;
        Ok(())
    }
}
