//! A provider's own PostgreSQL database as the record store, configured by a connection
//! string (`host=… port=… user=… dbname=…`, or a `postgresql://` URL).
//!
//! Two tables, created if missing: `medledger_blobs (cid, bytes)` and
//! `medledger_envelopes (cid, recipient, wrapped)`. Every statement is prepared with
//! parameters (no text from outside is ever spliced into SQL) and runs in autocommit, which
//! PostgreSQL makes durable before it answers (`synchronous_commit` on, its default).
//! Connections are pooled, at most `CONNECTIONS_MAX` at once.

use std::sync::{Condvar, Mutex};

use postgres::{Client, NoTls};

use super::{
    check_blob, check_cid, check_recipient, stored_envelope, RecordStore, RecordStoreError,
    LIST_MAX,
};
use crate::keywrap::WrappedKey;

/// Connections open at once, at most.
pub const CONNECTIONS_MAX: usize = 8;

const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS medledger_blobs (
        cid TEXT COLLATE \"C\" PRIMARY KEY,
        bytes BYTEA NOT NULL
    );
    CREATE TABLE IF NOT EXISTS medledger_envelopes (
        cid TEXT COLLATE \"C\" NOT NULL,
        recipient TEXT COLLATE \"C\" NOT NULL,
        wrapped BYTEA NOT NULL,
        PRIMARY KEY (cid, recipient)
    );
";

pub struct PostgresStore {
    config: postgres::Config,
    pool: Mutex<Pool>,
    returned: Condvar,
}

struct Pool {
    idle: Vec<Client>,
    open: usize,
}

/// Closing a connection blocks on the client's own runtime, which may not happen on an
/// async thread: a store dropped there (a node shutting down) closes its connections on a
/// thread of their own.
impl Drop for PostgresStore {
    fn drop(&mut self) {
        let idle = std::mem::take(&mut self.pool.get_mut().expect("pool lock").idle);
        if idle.is_empty() {
            return;
        }
        if tokio::runtime::Handle::try_current().is_ok() {
            let _ = std::thread::Builder::new()
                .name("medledger-pg-close".into())
                .spawn(move || drop(idle));
        } else {
            drop(idle);
        }
    }
}

fn backend(detail: impl std::fmt::Display) -> RecordStoreError {
    RecordStoreError::Backend {
        store: "postgresql",
        detail: detail.to_string(),
    }
}

impl PostgresStore {
    /// Connects to the database at `connection` and creates the tables if missing.
    pub fn connect(connection: &str) -> Result<PostgresStore, RecordStoreError> {
        let config: postgres::Config = connection
            .parse()
            .map_err(|e| backend(format!("the connection string does not parse: {e}")))?;
        let mut client = config.connect(NoTls).map_err(backend)?;
        client.batch_execute(SCHEMA).map_err(backend)?;
        Ok(PostgresStore {
            config,
            pool: Mutex::new(Pool {
                idle: vec![client],
                open: 1,
            }),
            returned: Condvar::new(),
        })
    }

    /// Runs `work` on a pooled connection; a connection that failed is closed, not reused.
    fn with_client<T>(
        &self,
        work: impl FnOnce(&mut Client) -> Result<T, postgres::Error>,
    ) -> Result<T, RecordStoreError> {
        let mut client = {
            let mut pool = self.pool.lock().expect("pool lock");
            loop {
                if let Some(client) = pool.idle.pop() {
                    break client;
                }
                if pool.open < CONNECTIONS_MAX {
                    pool.open += 1;
                    drop(pool);
                    match self.config.connect(NoTls) {
                        Ok(client) => break client,
                        Err(error) => {
                            self.release(None);
                            return Err(backend(error));
                        }
                    }
                }
                pool = self.returned.wait(pool).expect("pool lock");
            }
        };
        let result = work(&mut client);
        let healthy = result.is_ok() || !client.is_closed();
        self.release(healthy.then_some(client));
        result.map_err(backend)
    }

    fn release(&self, client: Option<Client>) {
        let mut pool = self.pool.lock().expect("pool lock");
        match client {
            Some(client) => pool.idle.push(client),
            None => pool.open -= 1,
        }
        drop(pool);
        self.returned.notify_one();
    }
}

impl RecordStore for PostgresStore {
    fn kind(&self) -> &'static str {
        "postgresql"
    }

    fn put_blob(&self, cid: &str, bytes: &[u8]) -> Result<(), RecordStoreError> {
        check_blob(cid, bytes)?;
        self.with_client(|client| {
            client.execute(
                "INSERT INTO medledger_blobs (cid, bytes) VALUES ($1, $2)
                 ON CONFLICT (cid) DO NOTHING",
                &[&cid, &bytes],
            )
        })?;
        Ok(())
    }

    fn get_blob(&self, cid: &str) -> Result<Option<Vec<u8>>, RecordStoreError> {
        check_cid(cid)?;
        let row = self.with_client(|client| {
            client.query_opt("SELECT bytes FROM medledger_blobs WHERE cid = $1", &[&cid])
        })?;
        Ok(row.map(|row| row.get::<_, Vec<u8>>(0)))
    }

    fn blob_ids(&self, after: Option<&str>, limit: usize) -> Result<Vec<String>, RecordStoreError> {
        let limit = limit.min(LIST_MAX) as i64;
        // Byte order (the columns' collation is "C"), as the embedded store lists, read
        // straight off the primary key's index.
        let rows = self.with_client(|client| match after {
            Some(after) => client.query(
                "SELECT cid FROM medledger_blobs WHERE cid > $1 ORDER BY cid LIMIT $2",
                &[&after, &limit],
            ),
            None => client.query(
                "SELECT cid FROM medledger_blobs ORDER BY cid LIMIT $1",
                &[&limit],
            ),
        })?;
        Ok(rows.iter().map(|row| row.get::<_, String>(0)).collect())
    }

    fn put_envelope(
        &self,
        cid: &str,
        recipient: &str,
        wrapped: &WrappedKey,
    ) -> Result<(), RecordStoreError> {
        check_cid(cid)?;
        check_recipient(recipient)?;
        let bytes = wrapped.as_bytes();
        self.with_client(|client| {
            client.execute(
                "INSERT INTO medledger_envelopes (cid, recipient, wrapped) VALUES ($1, $2, $3)
                 ON CONFLICT (cid, recipient) DO UPDATE SET wrapped = EXCLUDED.wrapped",
                &[&cid, &recipient, &bytes],
            )
        })?;
        Ok(())
    }

    fn get_envelope(
        &self,
        cid: &str,
        recipient: &str,
    ) -> Result<Option<WrappedKey>, RecordStoreError> {
        check_cid(cid)?;
        check_recipient(recipient)?;
        let row = self.with_client(|client| {
            client.query_opt(
                "SELECT wrapped FROM medledger_envelopes WHERE cid = $1 AND recipient = $2",
                &[&cid, &recipient],
            )
        })?;
        let Some(row) = row else {
            return Ok(None);
        };
        let bytes: Vec<u8> = row.get(0);
        stored_envelope(cid, recipient, &bytes).map(Some)
    }
}
