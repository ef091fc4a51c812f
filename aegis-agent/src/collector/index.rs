//! The collector's index: one SQLite row per bundle, to list bundles by host, incident,
//! severity and time without reading them.
//!
//! A row is claimed (`pending`) before the bundle is written to the store and marked
//! `stored` after, in that order, so that:
//! - the UNIQUE constraints on the digest and on (key id, sequence) decide, under
//!   concurrency too, which upload is the first and which is a replay, before anything is
//!   written;
//! - a collector that dies between the two leaves a `pending` row, which the next upload of
//!   the same bundle (the shipper retries until it is told "stored") completes; lists show
//!   `stored` rows only.
//!
//! The index is one file per collector; several collectors can share one object store
//! (digests name the same bytes everywhere), each with its own index.

use std::path::Path;

use anyhow::Context as _;
use rusqlite::{Connection, OptionalExtension as _, params};
use serde::Serialize;

use crate::evidence::bundle_meta::BundleMeta;

/// One indexed bundle, as `GET /v1/bundles` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct BundleRow {
    /// Hex SHA-256 of the envelope's bytes: its name in the store.
    pub digest: String,
    /// The enrolled agent's name (`[[agents]] name`).
    pub agent: String,
    pub host: String,
    pub key_id: String,
    pub sequence: u64,
    pub created: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub incident: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub severity: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
    pub size: u64,
    pub received: String,
}

/// What [`Index::claim`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// A new bundle: the caller stores it, then calls [`Index::mark_stored`].
    New,
    /// This digest was claimed before and not (known to be) stored: store it again (same
    /// bytes, same name), then mark it.
    Pending,
    /// This digest is stored.
    Stored,
    /// Another bundle (this digest) holds the same key and sequence.
    Replay { digest: String },
}

/// A filter of `GET /v1/bundles` (all optional; times are Unix milliseconds of `created`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Query {
    pub host: Option<String>,
    pub incident: Option<String>,
    pub severity: Option<String>,
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    pub limit: u32,
}

pub struct Index {
    db: Connection,
}

/// A fleet policy as the index keeps it.
pub struct StoredPolicy {
    pub version: u64,
    pub digest: String,
    pub published_ms: u64,
    /// The envelope's bytes, as published.
    pub body: Vec<u8>,
}

impl Index {
    /// Open (or create) the index at `path`.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let db = Connection::open(path).with_context(|| {
            format!("cannot open the index {}: give a writable path in [collector] index", path.display())
        })?;
        // WAL: readers (lists) do not wait for the writer; FULL: a row said stored survives a
        // power loss.
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "FULL")?;
        db.busy_timeout(std::time::Duration::from_secs(5))?;
        db.execute_batch(
            "CREATE TABLE IF NOT EXISTS bundles (
                digest TEXT PRIMARY KEY,
                agent TEXT NOT NULL,
                host TEXT NOT NULL,
                key_id TEXT NOT NULL,
                sequence INTEGER NOT NULL,
                created TEXT NOT NULL,
                created_ms INTEGER NOT NULL,
                incident TEXT,
                severity TEXT,
                since TEXT,
                until TEXT,
                size INTEGER NOT NULL,
                received TEXT NOT NULL,
                state TEXT NOT NULL CHECK (state IN ('pending', 'stored')),
                UNIQUE (key_id, sequence)
            );
            CREATE INDEX IF NOT EXISTS bundles_host ON bundles (host, created_ms);
            CREATE INDEX IF NOT EXISTS bundles_incident ON bundles (incident, created_ms);
            CREATE INDEX IF NOT EXISTS bundles_created ON bundles (created_ms);
            CREATE TABLE IF NOT EXISTS policies (
                version INTEGER PRIMARY KEY,
                digest TEXT NOT NULL,
                published_ms INTEGER NOT NULL,
                body BLOB NOT NULL
            );
            CREATE TABLE IF NOT EXISTS acks (
                agent TEXT PRIMARY KEY,
                ack TEXT NOT NULL,
                received_ms INTEGER NOT NULL
            );
            CREATE TABLE IF NOT EXISTS drill_results (
                drill TEXT NOT NULL,
                agent TEXT NOT NULL,
                result TEXT NOT NULL,
                received_ms INTEGER NOT NULL,
                PRIMARY KEY (drill, agent)
            );",
        )
        .with_context(|| format!("the index {} cannot be set up (is it another program's file?)", path.display()))?;
        Ok(Self { db })
    }

    /// Keep a published policy (the feed serves the highest version).
    pub fn put_policy(&self, version: u64, digest: &str, published_ms: u64, body: &[u8]) -> anyhow::Result<()> {
        self.db.execute(
            "INSERT INTO policies (version, digest, published_ms, body) VALUES (?1, ?2, ?3, ?4)",
            rusqlite::params![version as i64, digest, published_ms as i64, body],
        )?;
        Ok(())
    }

    /// The latest policy published.
    pub fn latest_policy(&self) -> anyhow::Result<Option<StoredPolicy>> {
        Ok(self
            .db
            .query_row(
                "SELECT version, digest, published_ms, body FROM policies ORDER BY version DESC LIMIT 1",
                [],
                |r| {
                    Ok(StoredPolicy {
                        version: r.get::<_, i64>(0)? as u64,
                        digest: r.get(1)?,
                        published_ms: r.get::<_, i64>(2)? as u64,
                        body: r.get(3)?,
                    })
                },
            )
            .optional()?)
    }

    /// Keep an agent's latest acknowledgement (JSON).
    pub fn put_ack(&self, agent: &str, ack: &str, received_ms: u64) -> anyhow::Result<()> {
        self.db.execute(
            "INSERT INTO acks (agent, ack, received_ms) VALUES (?1, ?2, ?3)
             ON CONFLICT (agent) DO UPDATE SET ack = excluded.ack, received_ms = excluded.received_ms",
            rusqlite::params![agent, ack, received_ms as i64],
        )?;
        Ok(())
    }

    /// Every agent's latest acknowledgement: (agent, ack JSON, received_ms).
    pub fn acks(&self) -> anyhow::Result<Vec<(String, String, u64)>> {
        let mut stmt = self.db.prepare("SELECT agent, ack, received_ms FROM acks ORDER BY agent")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Keep an agent's result of fleet drill `drill` (JSON; a repeat replaces it).
    pub fn put_drill_result(&self, drill: &str, agent: &str, result: &str, received_ms: u64) -> anyhow::Result<()> {
        self.db.execute(
            "INSERT INTO drill_results (drill, agent, result, received_ms) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (drill, agent) DO UPDATE SET result = excluded.result, received_ms = excluded.received_ms",
            rusqlite::params![drill, agent, result, received_ms as i64],
        )?;
        Ok(())
    }

    /// Every agent's result of fleet drill `drill`: (agent, result JSON, received_ms).
    pub fn drill_results(&self, drill: &str) -> anyhow::Result<Vec<(String, String, u64)>> {
        let mut stmt =
            self.db.prepare("SELECT agent, result, received_ms FROM drill_results WHERE drill = ?1 ORDER BY agent")?;
        let rows = stmt.query_map([drill], |r| Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Claim `digest` for the bundle `meta` of `agent` (`size` bytes), in one transaction.
    pub fn claim(&mut self, digest: &str, agent: &str, meta: &BundleMeta, size: u64) -> anyhow::Result<Claim> {
        let tx = self.db.transaction()?;
        let state: Option<String> =
            tx.query_row("SELECT state FROM bundles WHERE digest = ?1", [digest], |r| r.get(0)).optional()?;
        match state.as_deref() {
            Some("stored") => return Ok(Claim::Stored),
            Some(_) => return Ok(Claim::Pending),
            None => {}
        }
        let other: Option<String> = tx
            .query_row(
                "SELECT digest FROM bundles WHERE key_id = ?1 AND sequence = ?2",
                params![meta.agent.key_id, meta.sequence as i64],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(digest) = other {
            return Ok(Claim::Replay { digest });
        }
        tx.execute(
            "INSERT INTO bundles (digest, agent, host, key_id, sequence, created, created_ms, incident, severity,
                since, until, size, received, state)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, 'pending')",
            params![
                digest,
                agent,
                meta.agent.host,
                meta.agent.key_id,
                meta.sequence as i64,
                meta.created,
                meta.created_ms(),
                meta.incident.as_ref().map(|i| i.id.as_str()),
                meta.incident.as_ref().map(|i| i.severity.as_str()),
                meta.window.as_ref().map(|w| w.since.as_str()),
                meta.window.as_ref().map(|w| w.until.as_str()),
                size as i64,
                crate::clock::rfc3339_ms(crate::clock::now_unix_ms()),
            ],
        )?;
        tx.commit()?;
        Ok(Claim::New)
    }

    /// The bundle `digest` is in the store.
    pub fn mark_stored(&self, digest: &str) -> anyhow::Result<()> {
        let n = self.db.execute("UPDATE bundles SET state = 'stored' WHERE digest = ?1", [digest])?;
        anyhow::ensure!(n == 1, "the index has no row for {digest}");
        Ok(())
    }

    /// Forget a claim whose bundle could not be stored (so that a retry starts over).
    pub fn release(&self, digest: &str) -> anyhow::Result<()> {
        self.db.execute("DELETE FROM bundles WHERE digest = ?1 AND state = 'pending'", [digest])?;
        Ok(())
    }

    /// Whether `digest` is stored.
    pub fn is_stored(&self, digest: &str) -> anyhow::Result<bool> {
        Ok(self
            .db
            .query_row("SELECT 1 FROM bundles WHERE digest = ?1 AND state = 'stored'", [digest], |_| Ok(()))
            .optional()?
            .is_some())
    }

    /// Stored bundles matching `q`, oldest `created` first, at most `q.limit`.
    pub fn list(&self, q: &Query) -> anyhow::Result<Vec<BundleRow>> {
        let mut stmt = self.db.prepare_cached(
            "SELECT digest, agent, host, key_id, sequence, created, incident, severity, since, until, size, received
             FROM bundles
             WHERE state = 'stored'
               AND (?1 IS NULL OR host = ?1)
               AND (?2 IS NULL OR incident = ?2)
               AND (?3 IS NULL OR severity = ?3)
               AND (?4 IS NULL OR created_ms >= ?4)
               AND (?5 IS NULL OR created_ms <= ?5)
             ORDER BY created_ms, key_id, sequence
             LIMIT ?6",
        )?;
        let rows =
            stmt.query_map(params![q.host, q.incident, q.severity, q.since_ms, q.until_ms, i64::from(q.limit)], |r| {
                Ok(BundleRow {
                    digest: r.get(0)?,
                    agent: r.get(1)?,
                    host: r.get(2)?,
                    key_id: r.get(3)?,
                    sequence: r.get::<_, i64>(4)? as u64,
                    created: r.get(5)?,
                    incident: r.get(6)?,
                    severity: r.get(7)?,
                    since: r.get(8)?,
                    until: r.get(9)?,
                    size: r.get::<_, i64>(10)? as u64,
                    received: r.get(11)?,
                })
            })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        control::testutil::TempDir,
        evidence::bundle_meta::{AgentInfo, Incident, Severity},
    };

    fn meta(key: &str, sequence: u64, created: &str, incident: Option<(&str, Severity)>) -> BundleMeta {
        BundleMeta {
            agent: AgentInfo { host: format!("host-{}", &key[..1]), key_id: key.repeat(64), version: "1".into() },
            sequence,
            created: created.into(),
            incident: incident.map(|(id, severity)| Incident { id: id.into(), severity }),
            window: None,
        }
    }

    fn digest(n: u8) -> String {
        format!("{n:02x}").repeat(32)
    }

    #[test]
    fn claims_decide_new_retry_and_replay_and_survive_reopening() {
        let dir = TempDir::new("index-claim");
        let path = dir.path().join("sub/index.sqlite");
        let mut index = Index::open(&path).unwrap();
        let m = meta("a", 1, "2026-12-06T07:00:00Z", None);
        assert_eq!(index.claim(&digest(1), "web-1", &m, 10).unwrap(), Claim::New);
        assert!(!index.is_stored(&digest(1)).unwrap());
        assert!(
            index.list(&Query { limit: 10, ..Query::default() }).unwrap().is_empty(),
            "pending rows are not listed"
        );
        // A retry before it is stored: store again.
        assert_eq!(index.claim(&digest(1), "web-1", &m, 10).unwrap(), Claim::Pending);
        // Another bundle with the same key and sequence: a replay, whatever the state.
        assert_eq!(index.claim(&digest(2), "web-1", &m, 10).unwrap(), Claim::Replay { digest: digest(1) });
        index.mark_stored(&digest(1)).unwrap();
        assert_eq!(index.claim(&digest(1), "web-1", &m, 10).unwrap(), Claim::Stored);
        assert_eq!(index.claim(&digest(2), "web-1", &m, 10).unwrap(), Claim::Replay { digest: digest(1) });
        // The same sequence under another key is another bundle.
        assert_eq!(
            index.claim(&digest(3), "web-2", &meta("b", 1, "2026-12-06T07:00:00Z", None), 5).unwrap(),
            Claim::New
        );
        // A released claim frees its digest and its sequence.
        index.release(&digest(3)).unwrap();
        assert_eq!(
            index.claim(&digest(4), "web-2", &meta("b", 1, "2026-12-06T07:00:00Z", None), 5).unwrap(),
            Claim::New
        );
        // release never removes a stored row.
        index.release(&digest(1)).unwrap();
        assert!(index.is_stored(&digest(1)).unwrap());
        assert!(index.mark_stored(&digest(9)).is_err());
        drop(index);
        let index = Index::open(&path).unwrap();
        assert!(index.is_stored(&digest(1)).unwrap());
        assert!(!index.is_stored(&digest(4)).unwrap());
    }

    #[test]
    fn lists_filter_by_host_incident_severity_and_time() {
        let dir = TempDir::new("index-list");
        let mut index = Index::open(&dir.path().join("index.sqlite")).unwrap();
        let rows = [
            (1, meta("a", 1, "2026-12-06T07:00:00Z", None)),
            (2, meta("a", 2, "2026-12-06T08:00:00Z", Some(("INC-1", Severity::Sev1)))),
            (3, meta("b", 1, "2026-12-06T09:00:00+02:00", Some(("INC-1", Severity::Sev2)))),
            (4, meta("b", 2, "2026-12-06T10:00:00Z", Some(("INC-2", Severity::Sev2)))),
        ];
        for (n, m) in &rows {
            assert_eq!(index.claim(&digest(*n), "agent", m, 1).unwrap(), Claim::New);
            index.mark_stored(&digest(*n)).unwrap();
        }
        let digests = |q: Query| -> Vec<String> {
            index.list(&Query { limit: 100, ..q }).unwrap().into_iter().map(|r| r.digest).collect()
        };
        // 09:00+02:00 is 07:00Z: ordered by the instant, not the text.
        assert_eq!(digests(Query::default()), [digest(1), digest(3), digest(2), digest(4)]);
        assert_eq!(digests(Query { host: Some("host-b".into()), ..Query::default() }), [digest(3), digest(4)]);
        assert_eq!(digests(Query { incident: Some("INC-1".into()), ..Query::default() }), [digest(3), digest(2)]);
        assert_eq!(digests(Query { severity: Some("SEV-2".into()), ..Query::default() }), [digest(3), digest(4)]);
        let t = |s| crate::evidence::bundle_meta::parse_rfc3339_ms(s).unwrap();
        assert_eq!(
            digests(Query {
                since_ms: Some(t("2026-12-06T07:30:00Z")),
                until_ms: Some(t("2026-12-06T08:00:00Z")),
                ..Query::default()
            }),
            [digest(2)]
        );
        assert_eq!(index.list(&Query { limit: 1, ..Query::default() }).unwrap().len(), 1);
        let row = &index.list(&Query { incident: Some("INC-2".into()), limit: 1, ..Query::default() }).unwrap()[0];
        assert_eq!((row.sequence, row.severity.as_deref(), row.host.as_str()), (2, Some("SEV-2"), "host-b"));
    }
}
