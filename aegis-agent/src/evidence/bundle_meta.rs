//! What a collector indexes of an evidence bundle: the predicate of the in-toto Statement
//! that an evidence bundle's DSSE envelope signs.
//!
//! ```json
//! {"_type": "https://in-toto.io/Statement/v1",
//!  "subject": [{"name": "decisions.jsonl", "digest": {"sha256": "..."}}],
//!  "predicateType": "https://aegisplane.dev/evidence-bundle/v1",
//!  "predicate": {
//!    "agent": {"host": "web-1", "key_id": "<DSSE key id>", "version": "0.1.0"},
//!    "sequence": 17,
//!    "created": "2026-12-06T07:25:04.123456Z",
//!    "incident": {"id": "INC-42", "severity": "SEV-2"},
//!    "window": {"since": "2026-12-06T07:00:00Z", "until": "2026-12-06T07:25:00Z"}}}
//! ```
//!
//! `sequence` numbers the bundles of one agent key, from 1, with no reuse: the spool
//! ([`super::spool`]) assigns it when it signs, so a collector can tell a retry of a bundle
//! (same bytes) from a replay (same key and sequence, other bytes). `incident` and `window`
//! are optional; a predicate may carry more fields (the bundle builder's), which the
//! collector keeps in the bundle and does not index.
//!
//! Everything here is read from the network by the collector: [`BundleMeta::from_statement`]
//! checks each field and says which one is wrong.

use serde::{Deserialize, Serialize};

use super::{dsse::Statement, hex, key::VerifierKey};

/// The predicate type of an AegisPlane evidence bundle.
pub const PREDICATE_TYPE: &str = "https://aegisplane.dev/evidence-bundle/v1";
/// Longest host name, incident id or version the collector indexes.
const MAX_FIELD_CHARS: usize = 256;

/// The agent that made a bundle.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    /// The host's name (`[evidence] name`, or the host name).
    pub host: String,
    /// The DSSE key id of the key that signs the bundle (hex SHA-256 of the public key).
    pub key_id: String,
    /// The agent's version.
    pub version: String,
}

/// How bad an incident is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Severity {
    #[serde(rename = "SEV-1")]
    Sev1,
    #[serde(rename = "SEV-2")]
    Sev2,
    #[serde(rename = "SEV-3")]
    Sev3,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sev1 => "SEV-1",
            Self::Sev2 => "SEV-2",
            Self::Sev3 => "SEV-3",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::Sev1, Self::Sev2, Self::Sev3].into_iter().find(|v| v.as_str() == s)
    }
}

/// The incident a bundle is evidence for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Incident {
    pub id: String,
    pub severity: Severity,
}

/// The time the bundle's evidence covers (RFC 3339).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    pub since: String,
    pub until: String,
}

/// The indexed fields of an evidence bundle's predicate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleMeta {
    pub agent: AgentInfo,
    /// Per agent key, from 1, assigned by the spool.
    pub sequence: u64,
    /// When the bundle was signed (RFC 3339).
    pub created: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incident: Option<Incident>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<Window>,
}

/// Fills a [`BundleMeta`]: the bundle builder gives what it knows, the spool the sequence
/// and the time when it signs ([`Self::build`]).
#[derive(Clone, Debug, Default)]
pub struct BundleMetaBuilder {
    host: String,
    incident: Option<Incident>,
    window: Option<Window>,
    /// The builder's own predicate fields, kept beside the indexed ones.
    extra: serde_json::Map<String, serde_json::Value>,
}

impl BundleMetaBuilder {
    /// A bundle of the host named `host` (the key's name, as `key show` prints it).
    pub fn new(host: &str) -> Self {
        Self { host: host.to_owned(), ..Self::default() }
    }

    pub fn incident(mut self, id: &str, severity: Severity) -> Self {
        self.incident = Some(Incident { id: id.to_owned(), severity });
        self
    }

    pub fn window(mut self, since: &str, until: &str) -> Self {
        self.window = Some(Window { since: since.to_owned(), until: until.to_owned() });
        self
    }

    /// Another predicate field (not one of the indexed names).
    pub fn field(mut self, name: &str, value: serde_json::Value) -> Self {
        self.extra.insert(name.to_owned(), value);
        self
    }

    /// The predicate of a bundle signed by `key` as number `sequence` at `created`.
    pub fn build(&self, key: &VerifierKey, sequence: u64, created: &str) -> anyhow::Result<serde_json::Value> {
        let meta = BundleMeta {
            agent: AgentInfo {
                host: self.host.clone(),
                key_id: key.dsse_keyid(),
                version: env!("CARGO_PKG_VERSION").to_owned(),
            },
            sequence,
            created: created.to_owned(),
            incident: self.incident.clone(),
            window: self.window.clone(),
        };
        meta.check().map_err(anyhow::Error::msg)?;
        let mut predicate = self.extra.clone();
        let serde_json::Value::Object(indexed) = serde_json::to_value(&meta)? else { unreachable!("a struct") };
        predicate.extend(indexed);
        Ok(serde_json::Value::Object(predicate))
    }
}

impl BundleMeta {
    /// The indexed fields of a verified Statement, checked. `keyid` is the DSSE key id whose
    /// signature verified: the predicate must name it.
    pub fn from_statement(statement: &Statement, keyid: &str) -> Result<Self, String> {
        if statement.predicate_type != PREDICATE_TYPE {
            return Err(format!("predicateType is {:?}, not {PREDICATE_TYPE:?}", statement.predicate_type));
        }
        let meta: Self = serde_json::from_value(statement.predicate.clone())
            .map_err(|e| format!("the predicate is not an evidence bundle's: {e}"))?;
        meta.check()?;
        if meta.agent.key_id != keyid {
            return Err(format!(
                "predicate.agent.key_id is {}, but the bundle is signed by key id {keyid}",
                meta.agent.key_id
            ));
        }
        Ok(meta)
    }

    /// The rules of each field.
    fn check(&self) -> Result<(), String> {
        let text = |name: &str, v: &str| {
            if v.is_empty() || v.chars().count() > MAX_FIELD_CHARS || v.chars().any(char::is_control) {
                Err(format!("predicate.{name} must be 1 to {MAX_FIELD_CHARS} characters without control characters"))
            } else {
                Ok(())
            }
        };
        text("agent.host", &self.agent.host)?;
        text("agent.version", &self.agent.version)?;
        if hex::decode_hash(&self.agent.key_id).is_none() {
            return Err("predicate.agent.key_id must be a DSSE key id (64 lower-case hex digits)".into());
        }
        // Sequences are stored as SQLite integers (i64).
        if self.sequence == 0 || self.sequence > i64::MAX as u64 {
            return Err(format!("predicate.sequence must be from 1 to {}, not {}", i64::MAX, self.sequence));
        }
        parse_rfc3339_ms(&self.created).map_err(|e| format!("predicate.created: {e}"))?;
        if let Some(incident) = &self.incident {
            text("incident.id", &incident.id)?;
        }
        if let Some(w) = &self.window {
            let since = parse_rfc3339_ms(&w.since).map_err(|e| format!("predicate.window.since: {e}"))?;
            let until = parse_rfc3339_ms(&w.until).map_err(|e| format!("predicate.window.until: {e}"))?;
            if since > until {
                return Err("predicate.window.since is after window.until".into());
            }
        }
        Ok(())
    }

    /// `created` in Unix milliseconds (checked by [`Self::from_statement`]).
    pub fn created_ms(&self) -> i64 {
        parse_rfc3339_ms(&self.created).unwrap_or(0)
    }
}

/// RFC 3339 date-time (`2026-12-06T07:25:04.123Z`, `...+02:00`) as Unix milliseconds.
/// Strict: four-digit year, `T` (or `t`), seconds, at most 9 fraction digits, `Z` or an offset.
pub fn parse_rfc3339_ms(s: &str) -> Result<i64, String> {
    let bad = || format!("{s:?} is not an RFC 3339 time such as 2026-12-06T07:25:04Z");
    let b = s.as_bytes();
    if b.len() < 20 || b.len() > 40 {
        return Err(bad());
    }
    let num = |r: std::ops::Range<usize>| -> Result<i64, String> {
        let digits = &b[r];
        if digits.iter().all(u8::is_ascii_digit) {
            Ok(digits.iter().fold(0i64, |n, d| n * 10 + i64::from(d - b'0')))
        } else {
            Err(bad())
        }
    };
    if b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't') || b[13] != b':' || b[16] != b':' {
        return Err(bad());
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let month_days = [31, if leap { 29 } else { 28 }, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    if !(1..=12).contains(&month)
        || day < 1
        || day > month_days[month as usize - 1]
        || hour > 23
        || minute > 59
        || second > 60
    {
        return Err(bad());
    }
    let mut i = 19;
    let mut millis = 0;
    if b[i] == b'.' {
        let start = i + 1;
        i = start;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start || i - start > 9 {
            return Err(bad());
        }
        millis = num(start..(start + 3).min(i))? * 10i64.pow(3 - ((start + 3).min(i) - start) as u32);
    }
    let offset_min = match &b[i..] {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), _, _, b':', _, _] => {
            let (h, m) = (num(i + 1..i + 3)?, num(i + 4..i + 6)?);
            if h > 23 || m > 59 {
                return Err(bad());
            }
            if *sign == b'+' { h * 60 + m } else { -(h * 60 + m) }
        }
        _ => return Err(bad()),
    };
    // Days from civil (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second.min(59) - offset_min * 60;
    Ok(secs * 1000 + millis)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::evidence::{
        dsse::{STATEMENT_TYPE, Subject},
        key::HostKey,
    };

    #[test]
    fn rfc3339_parses_what_the_agent_writes_and_refuses_the_rest() {
        assert_eq!(parse_rfc3339_ms("1970-01-01T00:00:00Z"), Ok(0));
        assert_eq!(parse_rfc3339_ms("2026-12-06T07:25:04.123456Z"), Ok(1_796_541_904_123));
        assert_eq!(parse_rfc3339_ms("2026-12-06T09:25:04.1+02:00"), Ok(1_796_541_904_100));
        assert_eq!(parse_rfc3339_ms("2024-02-29T00:00:00Z"), Ok(1_709_164_800_000));
        let now = crate::clock::rfc3339(1_796_541_904_123_456_000);
        assert_eq!(parse_rfc3339_ms(&now), Ok(1_796_541_904_123));
        for bad in [
            "",
            "2026-12-06",
            "2026-12-06 07:25:04Z",
            "2026-13-06T07:25:04Z",
            "2025-02-29T07:25:04Z",
            "2026-12-06T24:00:00Z",
            "2026-12-06T07:25:04",
            "2026-12-06T07:25:04.Z",
            "2026-12-06T07:25:04.1234567890Z",
            "2026-12-06T07:25:04+0200",
            "2026-12-06T07:25:04Zjunk",
            "２026-12-06T07:25:04Z",
        ] {
            assert!(parse_rfc3339_ms(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_built_predicate_reads_back_and_each_bad_field_is_named() {
        let key = HostKey::from_seed([3; 32], "web-1").unwrap().verifier();
        let predicate = BundleMetaBuilder::new("web-1")
            .incident("INC-7", Severity::Sev2)
            .window("2026-12-06T07:00:00Z", "2026-12-06T07:25:00Z")
            .field("note", serde_json::json!("kept, not indexed"))
            .build(&key, 5, "2026-12-06T07:25:04Z")
            .unwrap();
        assert_eq!(predicate["incident"]["severity"], "SEV-2");
        assert_eq!(predicate["note"], "kept, not indexed");
        let statement = |predicate: serde_json::Value| Statement {
            statement_type: STATEMENT_TYPE.into(),
            subject: vec![Subject { name: "a".into(), digest: [("sha256".into(), "ab".repeat(32))].into() }],
            predicate_type: PREDICATE_TYPE.into(),
            predicate,
        };
        let meta = BundleMeta::from_statement(&statement(predicate.clone()), &key.dsse_keyid()).unwrap();
        assert_eq!((meta.sequence, meta.agent.host.as_str()), (5, "web-1"));
        assert_eq!(meta.incident.unwrap().severity, Severity::Sev2);

        let err = BundleMeta::from_statement(&statement(predicate.clone()), &"00".repeat(32)).unwrap_err();
        assert!(err.contains("but the bundle is signed by key id 0000"), "{err}");
        for (field, value, why) in [
            ("sequence", serde_json::json!(0), "predicate.sequence must be from 1"),
            ("sequence", serde_json::json!(-1), "not an evidence bundle's"),
            ("created", serde_json::json!("yesterday"), "predicate.created"),
            ("incident", serde_json::json!({"id": "x", "severity": "SEV-4"}), "unknown variant"),
            ("window", serde_json::json!({"since": "2026-12-07T00:00:00Z", "until": "2026-12-06T00:00:00Z"}), "after"),
            ("agent", serde_json::json!({"host": "", "key_id": key.dsse_keyid(), "version": "1"}), "agent.host"),
        ] {
            let mut p = predicate.clone();
            p[field] = value;
            let err = BundleMeta::from_statement(&statement(p), &key.dsse_keyid()).unwrap_err();
            assert!(err.contains(why), "{field}: {err}");
        }
        let mut other = statement(predicate);
        other.predicate_type = "https://example.com/x".into();
        assert!(BundleMeta::from_statement(&other, &key.dsse_keyid()).unwrap_err().contains("predicateType is"));
        assert!(BundleMetaBuilder::new("").build(&key, 1, "2026-12-06T07:25:04Z").is_err(), "checked when built");
    }
}
