//! SQLite backend (rusqlite, bundled): one connection in WAL mode, `synchronous = FULL` (a
//! committed enrollment survives a power cut: the WAL is flushed at every commit; enrollments
//! and liveness are written in batches so that costs one flush per batch), transactions
//! `BEGIN IMMEDIATE`.

use std::path::Path;
use std::sync::{Mutex, PoisonError};

use rusqlite::types::{Value as SqlValue, ValueRef};
use rusqlite::{Connection, TransactionBehavior};

use super::{Backend, DbError, RegistryError, Tx, Value};

/// The SQLite registry backend.
#[derive(Debug)]
pub struct Sqlite {
    conn: Mutex<Connection>,
}

fn err(what: impl Into<String>) -> impl FnOnce(rusqlite::Error) -> DbError {
    let what = what.into();
    move |e| DbError { backend: "sqlite", what, source: Box::new(e) }
}

impl Sqlite {
    /// Open (or create) the database file at `path` (`:memory:` for a private in-memory one).
    pub fn open(path: &Path) -> Result<Self, DbError> {
        let conn =
            Connection::open(path).map_err(err(format!("cannot open {}", path.display())))?;
        conn.set_prepared_statement_cache_capacity(64);
        conn.busy_timeout(std::time::Duration::from_secs(10)).map_err(err("busy_timeout"))?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(err("journal_mode = WAL"))?;
        conn.pragma_update(None, "synchronous", "FULL").map_err(err("synchronous"))?;
        conn.pragma_update(None, "foreign_keys", "ON").map_err(err("foreign_keys"))?;
        Ok(Self { conn: Mutex::new(conn) })
    }
}

impl Sqlite {
    /// One transaction begun with `behavior`: deferred for reads (no write lock), immediate for
    /// writes.
    fn run(
        &self,
        behavior: TransactionBehavior,
        f: &mut dyn FnMut(&mut dyn Tx) -> Result<(), RegistryError>,
    ) -> Result<(), RegistryError> {
        let mut conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        let tx = conn.transaction_with_behavior(behavior).map_err(err("BEGIN"))?;
        f(&mut SqliteTx(&tx))?;
        tx.commit().map_err(err("COMMIT"))?;
        Ok(())
    }
}

struct SqliteTx<'a>(&'a rusqlite::Transaction<'a>);

fn params(p: &[Value]) -> Vec<SqlValue> {
    p.iter()
        .map(|v| match v {
            Value::Int(Some(i)) => SqlValue::Integer(*i),
            Value::Text(Some(s)) => SqlValue::Text(s.clone()),
            Value::Int(None) | Value::Text(None) => SqlValue::Null,
        })
        .collect()
}

/// `$N` placeholders become SQLite's `?N`.
fn sql(s: &str) -> String {
    s.replace('$', "?")
}

impl Tx for SqliteTx<'_> {
    fn exec(&mut self, s: &str, p: &[Value]) -> Result<u64, DbError> {
        let what = s.lines().next().unwrap_or_default().trim();
        // Cached: a liveness batch runs one statement per node (`Registry::record_seen`).
        let mut stmt = self.0.prepare_cached(&sql(s)).map_err(err(what))?;
        let n = stmt.execute(rusqlite::params_from_iter(params(p))).map_err(err(what))?;
        Ok(n as u64)
    }

    fn query(&mut self, s: &str, p: &[Value]) -> Result<Vec<Vec<Value>>, DbError> {
        let what = s.lines().next().unwrap_or_default().trim().to_string();
        let mut stmt = self.0.prepare_cached(&sql(s)).map_err(err(what.clone()))?;
        let n = stmt.column_count();
        let mut rows =
            stmt.query(rusqlite::params_from_iter(params(p))).map_err(err(what.clone()))?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(err(what.clone()))? {
            let mut r = Vec::with_capacity(n);
            for c in 0..n {
                r.push(match row.get_ref(c).map_err(err(what.clone()))? {
                    ValueRef::Null => Value::Int(None),
                    ValueRef::Integer(i) => Value::Int(Some(i)),
                    ValueRef::Real(f) => Value::Int(Some(f as i64)),
                    ValueRef::Text(t) => Value::Text(Some(String::from_utf8_lossy(t).into_owned())),
                    ValueRef::Blob(b) => Value::Text(Some(String::from_utf8_lossy(b).into_owned())),
                });
            }
            out.push(r);
        }
        Ok(out)
    }
}

impl Backend for Sqlite {
    fn kind(&self) -> &'static str {
        "sqlite"
    }

    fn serial_pk(&self) -> &'static str {
        "INTEGER PRIMARY KEY AUTOINCREMENT"
    }

    fn read(
        &self,
        f: &mut dyn FnMut(&mut dyn Tx) -> Result<(), RegistryError>,
    ) -> Result<(), RegistryError> {
        self.run(TransactionBehavior::Deferred, f)
    }

    fn transact(
        &self,
        f: &mut dyn FnMut(&mut dyn Tx) -> Result<(), RegistryError>,
    ) -> Result<(), RegistryError> {
        self.run(TransactionBehavior::Immediate, f)
    }
}
