//! The rulepack file format (TOML), its validation and its digest.
//!
//! A rulepack is one TOML file: a `[pack]` table naming it, optional `[defaults]` for its
//! rules, any number of `[[rules]]` (what a text must not contain) and `[[policies]]`
//! (which providers and models a tenant may call). A gitleaks config is accepted too and
//! converted (see [`super::gitleaks`]); [`load`] tells them apart by content.
//!
//! ```toml
//! [pack]
//! name = "aegis-default"            # required
//! version = "2026.11.26"            # required (a string)
//! description = "..."               # optional, informational
//!
//! [defaults]                        # optional; each key may be left out
//! action = "warn"                   # allow | warn | block          (built-in: warn)
//! severity = "SEV-3"                # SEV-1 | SEV-2 | SEV-3         (built-in: SEV-3)
//! direction = "both"                # request | response | both     (built-in: both)
//! scope = []                        # see `scope` below             (built-in: [] = all)
//! evidence = "redacted"             # redacted | full               (built-in: redacted)
//!
//! [[rules]]
//! id = "secret.openai_api_key"      # required, unique in the pack (rules and policies)
//! category = "secret"               # required: prompt_injection | jailbreak | secret |
//!                                   #   pii | unsafe_output | policy
//! direction = "request"             # default from [defaults]
//! scope = ["user", "tool"]          # request: system | user | assistant | tool;
//!                                   # response: output; [] or omitted = every scope.
//!                                   # Plain text (`scan --as text`) has no roles and
//!                                   # is checked against every rule ("text" may be
//!                                   # listed, for clarity)
//! keywords = ["sk-"]                # literal prefilter; each match contains one
//! regex = '''sk-(?:proj-)?[a-z0-9_-]{20,256}'''   # optional without keywords
//! secret_group = 0                  # capture group holding the secret; 0 = whole match
//! prefilter = { digits = 12 }       # instead of keywords, for numbers (see below)
//! validators = ["luhn", "iban", "jwt", "es_dni", { entropy = { min = 3.5 } }]
//!                                   # also: live_card, test_card, fr_nir, de_steuer_id,
//!                                   # it_codice_fiscale, aadhaar, br_cpf (validators.rs)
//! allow_regexes = ['''^sk-x+$''']   # a secret one of these matches is not a finding
//! allow_match_regexes = []          # same, tried on the whole regex match
//! stopwords = ["example"]           # a secret containing one of these is not a finding
//! action = "block"                  # default from [defaults]
//! severity = "SEV-2"                # default from [defaults]
//! rationale = "Why this matters."   # required, shown in decisions
//! evidence = "redacted"             # default from [defaults]
//! examples.positive = ["..."]       # each must be a finding of this rule
//! examples.negative = ["..."]       # none may be
//! kernel = false                    # true: also enforced in the kernel (see below)
//!
//! [[policies]]                      # provider/model allowlist ("policy drift")
//! id = "policy.approved_providers"  # required, unique
//! tenant = "*"                      # cgroup path prefix, or "*" (the default)
//! allow_providers = ["openai"]      # required, not empty
//! allow_models = ["gpt-4o*"]        # globs; empty or omitted = every model
//! action = "warn"                   # default from [defaults]
//! severity = "SEV-2"                # default from [defaults]
//! rationale = "..."                 # required
//! ```
//!
//! Unknown keys are errors, so a typo never silently disables a rule.
//!
//! # What rules see
//!
//! Rules match the *normalised* text ([`super::normalize`]): case-folded (lower case), NFKC,
//! invisible characters removed, look-alike letters folded; base64, hex and percent-encoded
//! segments are decoded and scanned too (a finding there carries the segment's span and
//! encoding). Consequences for authors:
//!
//! - Keywords, stopwords and examples are normalised the same way; write them in any case.
//! - Regexes ([Rust `regex` syntax](https://docs.rs/regex)) are case-insensitive and run
//!   over lower-cased text: `AKIA[0-9A-Z]{16}` and `akia[0-9a-z]{16}` are the same rule.
//!   Case-sensitive secret formats are matched by their case-folded shape, which is enough
//!   to find them (and to hash them for evidence) but cannot tell `AbC` from `abc`; a part
//!   made case-sensitive on purpose (`(?-i:API)`) can only match lower case.
//! - Validators see the match as it was in the input (original case) whenever it can be
//!   located there, which is always the case for ASCII text; otherwise the normalised text.
//!   That is what makes `jwt` (base64url is case-sensitive) and `entropy` exact.
//! - `\w`, `\d`, `\s` and `\b` are Unicode-aware; prefer ASCII classes (`[a-z0-9_]`) in
//!   repeated parts, and `(?-u:\b)` for word boundaries: they compile smaller and run
//!   faster.
//!
//! # Matching
//!
//! A rule is evaluated on a text only when its prefilter says it may match, and only where
//! it says:
//!
//! - `keywords`: at least one keyword occurs in the text (as a substring). **Every match
//!   must contain one of the rule's keywords**: when the regex's longest match is bounded
//!   (no `+`, `*` or `{n,}`), it only runs around the keyword occurrences. Write
//!   `[a-z0-9]{20,128}` rather than `[a-z0-9]{20,}`, `\s{1,16}` rather than `\s+`, and
//!   keep keywords that span words spelled with single spaces, as the regex around them.
//!   Choose keywords selective: every occurrence costs a check, and a rule whose keyword
//!   is frequent runs its regex on most texts.
//! - `prefilter = { digits = N }` (exclusive with `keywords`, needs a `regex`), for numbers
//!   without a literal (cards, IBANs, phone numbers, national ids): the text has a run of
//!   at least N ASCII digits, where consecutive digits may be separated by at most two of
//!   `space - . / ( ) +` ("4111 1111-1111 1111" is a run of 16, "+1 (415) 555-0100" of 11,
//!   "DE89 3704 …" of 2, then of the rest). The regex runs within 32 bytes of each such
//!   run, so every match must lie there. JSON is full of numbers: keep N as high as the
//!   format allows.
//! - A regex without either gets the literals every match must start (or end) with,
//!   extracted from the regex, as implicit keywords when they are at least 3 bytes long;
//!   failing that it runs over every whole text and counts in `Engine::unfiltered_rules`.
//!
//! A keyword-only rule (no regex) matches every keyword occurrence. Each match, or its
//! `secret_group`, must pass every validator, must not be matched by an `allow_regexes`
//! entry (nor the whole match by `allow_match_regexes`) and must not contain a stopword.
//! Findings are deduplicated per rule and span.
//!
//! # Kernel rules
//!
//! `kernel = true` also loads the rule's keywords into the in-kernel content gate
//! (`enforce::gate`): a request whose plaintext contains one is refused at its send, before
//! any byte leaves the host, and its connection is cut. The kernel compares raw bytes, ASCII
//! case-insensitively, over the first 16 KiB of each TLS write (headers and body as sent,
//! no JSON unescaping, no decoding, no roles), so only what can be decided that way is
//! accepted:
//!
//! - `action = "block"` (after defaults) and `direction` `request` or `both`;
//! - `keywords` only: no `regex`, `prefilter`, `validators`, `allow_regexes`,
//!   `allow_match_regexes`, `stopwords`, and no `scope`;
//! - each keyword [`KERNEL_KEYWORD_MIN`] to [`KERNEL_KEYWORD_MAX`] ASCII bytes (4 to 32);
//! - at most [`KERNEL_KEYWORDS_MAX`] (32) kernel keywords in all, over every loaded pack.
//!
//! The rule still runs in user space like any other (on the normalised text), so a match
//! the kernel cannot see (an escaped or encoded keyword) is still found there.
//! `Engine::kernel_keywords` lists the keywords with their rules.
//!
//! # Validation
//!
//! [`load`] rejects a pack with a [`PackError`] naming the file, line and rule: TOML
//! syntax, unknown keys, wrong types or enum values, missing `[pack]` name or version,
//! empty or duplicate ids, a rule with neither keywords nor regex, empty keywords, an
//! invalid regex (with the regex error), a regex over the compiled size limit
//! ([`REGEX_SIZE_LIMIT`]), `secret_group` beyond the regex's groups, a `prefilter` with
//! keywords or without regex, a scope the direction never has (`output` on a request
//! rule, `user` on a response rule), an entropy minimum outside 0..=8, a missing
//! rationale, a `kernel = true` rule that is not a literal-keyword block rule or whose
//! keywords the kernel cannot take, and a policy without providers.
//!
//! # Limits
//!
//! A pack is configuration, but a wrong or hostile one must fail fast and clearly, never
//! leave the agent compiling for minutes or filling memory. Loading refuses, with the file,
//! the line and rule where the limit was crossed, the limit and what to do:
//!
//! | what | limit |
//! | --- | --- |
//! | pack file size ([`MAX_PACK_BYTES`]) | 8 MiB |
//! | rules and policies in a pack ([`MAX_RULES_PER_PACK`]) | 4,096 |
//! | keywords of a rule ([`MAX_KEYWORDS_PER_RULE`]) | 256 |
//! | bytes of a keyword ([`MAX_KEYWORD_BYTES`]) | 256 |
//! | keywords of a pack ([`MAX_KEYWORDS_PER_PACK`]) | 4,096 |
//! | keyword bytes of a pack, all keywords together ([`MAX_KEYWORD_TOTAL_BYTES`]) | 256 KiB |
//! | regexes of a rule: `regex`, `allow_regexes`, `allow_match_regexes` ([`MAX_REGEXES_PER_RULE`]) | 64 |
//! | bytes of a regex ([`MAX_REGEX_BYTES`]) | 4 KiB |
//! | regexes of a pack ([`MAX_REGEXES_PER_PACK`]) | 8,192 |
//! | stopwords of a rule ([`MAX_STOPWORDS_PER_RULE`]) | 4,096 |
//! | stopwords of a pack ([`MAX_STOPWORDS_PER_PACK`]) | 65,536 |
//!
//! A gitleaks config counts after conversion: its global allowlists are copied into every
//! rule, so 200 rules and 10 global regexes are 2,000 regexes. Over every loaded pack
//! together, the engine takes at most [`MAX_KEYWORDS_LOADED`] keywords and
//! [`MAX_REGEXES_LOADED`] regexes (`super::engine`). With these limits the largest
//! acceptable pack set compiles in about a second; the cost that was unbounded is the
//! keyword prefilter's construction, which grows with the square of the distinct keywords
//! (20,000 keywords took 1.2 s, 200,000 never finished).
//!
//! # Digest
//!
//! `digest` is `"sha256:"` + the hex SHA-256 of the file's bytes: two agents running the
//! same pack report the same digest, and any edit changes it.

use std::{
    collections::HashMap,
    ops::Range,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use toml::Spanned;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    PromptInjection,
    Jailbreak,
    Secret,
    Pii,
    UnsafeOutput,
    Policy,
}

/// Which half of a call a rule looks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Request,
    Response,
    Both,
}

/// Which part of an API body a text comes from. Requests: the role of the message it is
/// in (`system`, `user`, `assistant`, `tool`); responses: `output`. `text` is a plain
/// text scanned with no API structure (`aegis-agent scan --as text`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    System,
    User,
    Assistant,
    Tool,
    Output,
    Text,
}

impl Scope {
    /// Every scope, in declaration order.
    pub const ALL: [Scope; 6] = [Scope::System, Scope::User, Scope::Assistant, Scope::Tool, Scope::Output, Scope::Text];

    /// Whether texts of this scope occur in `direction` (`Both`: in either).
    pub fn occurs_in(self, direction: Direction) -> bool {
        match (self, direction) {
            (Scope::Text, _) | (_, Direction::Both) => true,
            (Scope::Output, d) => d == Direction::Response,
            (_, d) => d == Direction::Request,
        }
    }
}

/// Ordered: a stronger action wins when several rules match.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Allow,
    Warn,
    Block,
}

/// Ordered by urgency: SEV-1 > SEV-2 > SEV-3 (derive order is Sev3 < Sev2 < Sev1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Severity {
    #[serde(rename = "SEV-3")]
    Sev3,
    #[serde(rename = "SEV-2")]
    Sev2,
    #[serde(rename = "SEV-1")]
    Sev1,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Validator {
    Luhn,
    Iban,
    Jwt,
    /// Spanish national id (DNI, or NIE with an X/Y/Z prefix): the mod-23 control letter.
    EsDni,
    /// A payment card number that may be live: Luhn-valid and not one of the payment
    /// networks' published test numbers.
    LiveCard,
    /// One of the payment networks' published test card numbers.
    TestCard,
    /// French NIR (INSEE number): its mod-97 key.
    FrNir,
    /// German tax id (Steuer-ID): digit pattern and ISO 7064 MOD 11,10 check digit.
    DeSteuerId,
    /// Italian codice fiscale: its check letter.
    ItCodiceFiscale,
    /// Indian Aadhaar number: its Verhoeff check digit.
    Aadhaar,
    /// Brazilian CPF: its two mod-11 check digits.
    BrCpf,
    /// Shannon entropy of the match (or secret group) at least `min` bits per char.
    Entropy {
        min: f64,
    },
}

/// A cheap test that decides whether a rule without keywords is evaluated on a text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prefilter {
    /// The text has a run of at least this many ASCII digits, consecutive digits being
    /// separated by at most two of `space - . / ( ) +`.
    Digits(usize),
}

/// How a match is kept as evidence.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EvidenceMode {
    /// Masked text plus a keyed hash (the default).
    #[default]
    Redacted,
    /// The matched text as is (for rules whose matches are not sensitive, e.g. an
    /// injection phrase).
    Full,
}

/// What a rule matches.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Matcher {
    /// Literal keywords (matched case-insensitively on normalised text). A rule with
    /// keywords is only evaluated where one occurs. Without a regex, a keyword hit is
    /// the match.
    pub keywords: Vec<String>,
    pub regex: Option<String>,
    /// Capture group holding the secret (gitleaks `secretGroup`); 0 = whole match.
    pub secret_group: usize,
    /// For a regex without keywords: when to evaluate it (exclusive with `keywords`).
    pub prefilter: Option<Prefilter>,
    pub validators: Vec<Validator>,
    /// A match whose secret (the secret group, or the whole match) one of these regexes
    /// matches is not a finding.
    pub allow_regexes: Vec<String>,
    /// A match that one of these regexes matches (tried on the whole regex match, as
    /// gitleaks' `regexTarget = "match"`) is not a finding.
    pub allow_match_regexes: Vec<String>,
    /// A match containing one of these (case-insensitive) is not a finding.
    pub stopwords: Vec<String>,
    /// Allowlists whose parts must all hit (gitleaks `condition = "AND"`; from gitleaks
    /// configs only).
    pub allow_all: Vec<AllowAll>,
}

/// An allowlist that applies only when each of its parts hits: one of `regexes` matches
/// the secret (or, with `on_match`, the whole match) *and* the secret contains one of
/// `stopwords`. A part left empty always hits.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AllowAll {
    pub regexes: Vec<String>,
    pub on_match: bool,
    pub stopwords: Vec<String>,
}

impl Matcher {
    /// Every allowlist regex: `allow_regexes`, `allow_match_regexes`, and those of `allow_all`.
    pub fn allow_regex_count(&self) -> usize {
        self.allow_regexes.len()
            + self.allow_match_regexes.len()
            + self.allow_all.iter().map(|a| a.regexes.len()).sum::<usize>()
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Examples {
    /// Each must produce a finding of this rule.
    pub positive: Vec<String>,
    /// None may produce a finding of this rule.
    pub negative: Vec<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    pub id: String,
    pub category: Category,
    pub direction: Direction,
    /// Empty: every scope.
    pub scope: Vec<Scope>,
    pub matcher: Matcher,
    pub action: Action,
    pub severity: Severity,
    pub rationale: String,
    pub evidence: EvidenceMode,
    pub examples: Examples,
    /// Also enforced by the in-kernel content gate (see "Kernel rules").
    pub kernel: bool,
    /// Line of the rule in its file (1-based), for error messages.
    pub line: usize,
}

impl Rule {
    /// Whether the rule looks at texts of `scope` in `direction` (`Both`: in either half).
    /// Plain text (`Scope::Text`) has no roles: every rule of the direction looks at it.
    pub fn applies(&self, direction: Direction, scope: Scope) -> bool {
        let direction_ok =
            direction == Direction::Both || self.direction == Direction::Both || self.direction == direction;
        direction_ok && (scope == Scope::Text || self.scope.is_empty() || self.scope.contains(&scope))
    }
}

/// Provider/model allowlist for a tenant: a call outside it is a finding (policy drift).
#[derive(Clone, Debug, PartialEq)]
pub struct ProviderPolicy {
    pub id: String,
    /// cgroup path prefix ("/system.slice/chat.service"), or "*" for every process.
    pub tenant: String,
    /// Provider names as in call records ("openai", "anthropic", "openai_compatible"...).
    pub allow_providers: Vec<String>,
    /// Model globs ("gpt-4o*", "claude-*"); empty allows every model of an allowed provider.
    pub allow_models: Vec<String>,
    pub action: Action,
    pub severity: Severity,
    pub rationale: String,
    pub line: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Rulepack {
    pub name: String,
    pub version: String,
    /// "sha256:<hex>" of the file's bytes, computed by the agent.
    pub digest: String,
    pub source: PathBuf,
    pub rules: Vec<Rule>,
    pub policies: Vec<ProviderPolicy>,
}

/// Why a rulepack was rejected: file, line and rule and reason.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}{}{}: {message}", file.display(), line.map(|l| format!(":{l}")).unwrap_or_default(), rule.as_ref().map(|r| format!(": rule {r}")).unwrap_or_default())]
pub struct PackError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub rule: Option<String>,
    pub message: String,
}

impl PackError {
    pub(crate) fn new(file: &Path, line: Option<usize>, rule: Option<&str>, message: impl Into<String>) -> Self {
        Self { file: file.to_owned(), line, rule: rule.map(str::to_owned), message: message.into() }
    }
}

/// Largest compiled program a rule regex may have (bytes, the `regex` crate's
/// `size_limit`). Beyond it the pack is rejected: counted repetitions of large classes
/// (`\w{1000}`) are the usual cause.
pub const REGEX_SIZE_LIMIT: usize = 1 << 20;
/// Lazy DFA cache per regex (the `regex` crate's `dfa_size_limit`).
pub const REGEX_DFA_SIZE_LIMIT: usize = 2 << 20;

/// Largest pack file read, in bytes (see "Limits"); larger files are refused unread.
pub const MAX_PACK_BYTES: u64 = 8 << 20;
/// Rules and policies of one pack, together.
pub const MAX_RULES_PER_PACK: usize = 4096;
/// Keywords of one rule: a longer list is a dictionary, better written as a regex.
pub const MAX_KEYWORDS_PER_RULE: usize = 256;
/// Bytes of one keyword (a keyword is a short literal that every match contains).
pub const MAX_KEYWORD_BYTES: usize = 256;
/// Keywords of one pack, every rule together.
pub const MAX_KEYWORDS_PER_PACK: usize = 4096;
/// Bytes of every keyword of one pack together.
pub const MAX_KEYWORD_TOTAL_BYTES: usize = 256 << 10;
/// Regexes of one rule: its `regex`, `allow_regexes` and `allow_match_regexes`.
pub const MAX_REGEXES_PER_RULE: usize = 64;
/// Bytes of one regex's source.
pub const MAX_REGEX_BYTES: usize = 4 << 10;
/// Regexes of one pack, every rule together (each compiles to at most [`REGEX_SIZE_LIMIT`]).
pub const MAX_REGEXES_PER_PACK: usize = 8192;
/// Stopwords of one rule (each match is checked against all of them).
pub const MAX_STOPWORDS_PER_RULE: usize = 4096;
/// Stopwords of one pack, every rule together.
pub const MAX_STOPWORDS_PER_PACK: usize = 65536;
/// Keywords over every loaded pack (the engine's prefilter is built from all of them).
pub const MAX_KEYWORDS_LOADED: usize = 8192;
/// Regexes over every loaded pack.
pub const MAX_REGEXES_LOADED: usize = 16384;

/// Kernel keywords over every loaded pack, at most (the content gate's table size).
pub const KERNEL_KEYWORDS_MAX: usize = aegis_common::gate::GATE_KEYWORDS_MAX;
/// Length bounds of a kernel keyword, bytes: one 4-byte gram at least, four 8-byte words
/// at most.
pub const KERNEL_KEYWORD_MIN: usize = aegis_common::gate::GATE_KEYWORD_MIN;
pub const KERNEL_KEYWORD_MAX: usize = aegis_common::gate::GATE_KEYWORD_MAX;

/// Load a rulepack file: the AegisPlane format, or a gitleaks config (recognised by its
/// content) loaded through [`super::gitleaks`].
pub fn load(path: &Path) -> Result<Rulepack, PackError> {
    let text = crate::files::read_capped_to_string(path, MAX_PACK_BYTES, "split it into several packs")
        .map_err(|e| PackError::new(path, None, None, format!("cannot read the pack: {e}")))?;
    parse(&text, path)
}

/// Parse and validate rulepack text; `source` names it in errors. A gitleaks config
/// ([`super::gitleaks::looks_like_gitleaks`]) is converted.
pub fn parse(text: &str, source: &Path) -> Result<Rulepack, PackError> {
    if super::gitleaks::looks_like_gitleaks(text) {
        return super::gitleaks::parse(text, source);
    }
    parse_native(text, source)
}

/// `"sha256:<hex>"` of `bytes`.
pub fn digest(bytes: &[u8]) -> String {
    let hash = Sha256::digest(bytes);
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256:");
    for b in hash.iter() {
        out.push(char::from_digit(u32::from(b >> 4), 16).unwrap_or('0'));
        out.push(char::from_digit(u32::from(b & 0xf), 16).unwrap_or('0'));
    }
    out
}

/// Compile a rule regex as the engine runs it: case-insensitive, within the size limits.
/// The error is one line, fit for a [`PackError`].
pub(crate) fn compile_regex(pattern: &str) -> Result<regex::Regex, String> {
    regex::RegexBuilder::new(pattern)
        .case_insensitive(true)
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(REGEX_DFA_SIZE_LIMIT)
        .build()
        .map_err(|e| match e {
            regex::Error::CompiledTooBig(limit) => format!(
                "regex too large: it compiles to more than the {limit}-byte limit (use smaller \
                 repetition counts, or ASCII classes instead of \\w, \\d, \\s)"
            ),
            regex::Error::Syntax(msg) => format!("invalid regex: {}", syntax_error_summary(&msg)),
            other => format!("invalid regex: {other}"),
        })
}

/// The regex crate's multi-line syntax error as "what, at column N".
fn syntax_error_summary(msg: &str) -> String {
    let lines: Vec<&str> = msg.lines().collect();
    let what = lines.iter().rev().find_map(|l| l.strip_prefix("error: ")).unwrap_or(msg).trim();
    let column = lines.iter().find_map(|l| {
        let t = l.trim_start();
        (t.starts_with('^') && t.chars().all(|c| c == '^')).then(|| l.len() - t.len())
    });
    // The crate indents the pattern and the caret line by 4 spaces.
    match column {
        Some(c) if c >= 4 => format!("{what} (at column {})", c - 4 + 1),
        _ => what.to_owned(),
    }
}

/// Which part of a rule a validation problem is about (the native parser maps it to the
/// line of that key).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Field {
    Rule,
    Id,
    Keywords,
    Regex,
    SecretGroup,
    Prefilter,
    Validators,
    AllowRegexes,
    AllowMatchRegexes,
    Stopwords,
    Scope,
    Rationale,
    Kernel,
}

/// Semantic checks shared by every way a rule is made (this format, gitleaks, the
/// engine): `Err((field, why))`.
pub(crate) fn check_rule(rule: &Rule) -> Result<(), (Field, String)> {
    check_id(&rule.id).map_err(|m| (Field::Id, m))?;
    // Sizes first: nothing is compiled for a rule over a limit.
    check_rule_limits(&rule.matcher)?;
    if rule.rationale.trim().is_empty() {
        return Err((Field::Rationale, "a rule needs a rationale (why a match matters)".into()));
    }
    let m = &rule.matcher;
    if m.keywords.iter().any(|k| k.is_empty()) {
        return Err((Field::Keywords, "empty keyword".into()));
    }
    match (&m.regex, m.prefilter) {
        (None, Some(_)) => return Err((Field::Prefilter, "`prefilter` needs a `regex`".into())),
        (None, None) if m.keywords.is_empty() => {
            return Err((Field::Rule, "a rule needs `keywords`, a `regex`, or both".into()));
        }
        (_, Some(_)) if !m.keywords.is_empty() => {
            return Err((Field::Prefilter, "`prefilter` and `keywords` exclude each other".into()));
        }
        _ => {}
    }
    if let Some(Prefilter::Digits(n)) = m.prefilter
        && !(1..=64).contains(&n)
    {
        return Err((Field::Prefilter, format!("`digits` must be within 1..=64, not {n}")));
    }
    match &m.regex {
        Some(pattern) => {
            let re = compile_regex(pattern).map_err(|e| (Field::Regex, e))?;
            let groups = re.captures_len() - 1;
            if m.secret_group > groups {
                return Err((
                    Field::SecretGroup,
                    format!("secret_group {} but the regex has {groups} capture group(s)", m.secret_group),
                ));
            }
        }
        None if m.secret_group != 0 => {
            return Err((Field::SecretGroup, "secret_group needs a regex".into()));
        }
        None => {}
    }
    for v in &m.validators {
        if let Validator::Entropy { min } = v
            && !(0.0..=8.0).contains(min)
        {
            return Err((Field::Validators, format!("entropy min {min} is outside 0..=8 (bits per character)")));
        }
    }
    for (field, list) in [(Field::AllowRegexes, &m.allow_regexes), (Field::AllowMatchRegexes, &m.allow_match_regexes)] {
        for pattern in list {
            compile_regex(pattern).map_err(|e| (field, format!("allowlist: {e}")))?;
        }
    }
    for pattern in m.allow_all.iter().flat_map(|a| &a.regexes) {
        compile_regex(pattern).map_err(|e| (Field::AllowRegexes, format!("allowlist: {e}")))?;
    }
    let stopwords = m.stopwords.iter().chain(m.allow_all.iter().flat_map(|a| &a.stopwords));
    if stopwords.into_iter().any(|s| s.is_empty()) {
        return Err((Field::Stopwords, "empty stopword".into()));
    }
    if let Some(bad) = rule.scope.iter().find(|s| !s.occurs_in(rule.direction)) {
        let scope = serde_json::to_string(bad).unwrap_or_default();
        let dir = serde_json::to_string(&rule.direction).unwrap_or_default();
        return Err((Field::Scope, format!("scope {scope} never occurs in direction {dir}")));
    }
    if rule.kernel {
        check_kernel_rule(rule)?;
    }
    Ok(())
}

/// The per-rule limits (see "Limits"), checked before anything of the rule is compiled.
pub(crate) fn check_rule_limits(m: &Matcher) -> Result<(), (Field, String)> {
    if m.keywords.len() > MAX_KEYWORDS_PER_RULE {
        return Err((
            Field::Keywords,
            format!(
                "{} keywords, over the limit of {MAX_KEYWORDS_PER_RULE} per rule: split the rule, or match the \
                 list with a regex",
                m.keywords.len()
            ),
        ));
    }
    if let Some(k) = m.keywords.iter().find(|k| k.len() > MAX_KEYWORD_BYTES) {
        return Err((
            Field::Keywords,
            format!(
                "a keyword of {} bytes, over the limit of {MAX_KEYWORD_BYTES}: keep keywords to the short literal \
                 every match contains ({:?}...)",
                k.len(),
                k.chars().take(24).collect::<String>()
            ),
        ));
    }
    let regexes = m
        .regex
        .iter()
        .chain(&m.allow_regexes)
        .chain(&m.allow_match_regexes)
        .chain(m.allow_all.iter().flat_map(|a| &a.regexes));
    if let Some(r) = regexes.clone().find(|r| r.len() > MAX_REGEX_BYTES) {
        let field = if m.regex.as_ref() == Some(r) { Field::Regex } else { Field::AllowRegexes };
        return Err((
            field,
            format!("a regex of {} bytes, over the limit of {MAX_REGEX_BYTES}: split it over several rules", r.len()),
        ));
    }
    let count = regexes.count();
    if count > MAX_REGEXES_PER_RULE {
        return Err((
            Field::AllowRegexes,
            format!(
                "{count} regexes (regex and allowlists), over the limit of {MAX_REGEXES_PER_RULE} per rule: merge \
                 allowlist regexes into alternations"
            ),
        ));
    }
    if m.stopwords.len() > MAX_STOPWORDS_PER_RULE {
        return Err((
            Field::Stopwords,
            format!(
                "{} stopwords, over the limit of {MAX_STOPWORDS_PER_RULE} per rule: keep the ones that occur in \
                 false positives",
                m.stopwords.len()
            ),
        ));
    }
    Ok(())
}

/// What a pack holds so far, against the per-pack limits (see "Limits"). Checked for each
/// rule before it is compiled: loading stops at the rule that crosses a limit (a gitleaks
/// config is counted whole first, since its global allowlists multiply).
#[derive(Default)]
pub(crate) struct PackBudget {
    entries: usize,
    keywords: usize,
    keyword_bytes: usize,
    regexes: usize,
    stopwords: usize,
}

impl PackBudget {
    /// Count one more rule (or policy: `matcher` None); `Err` names what went over.
    pub(crate) fn add(&mut self, matcher: Option<&Matcher>) -> Result<(), (Field, String)> {
        self.entries += 1;
        if self.entries > MAX_RULES_PER_PACK {
            return Err((
                Field::Rule,
                format!("more than {MAX_RULES_PER_PACK} rules and policies in one pack: split it into several packs"),
            ));
        }
        let Some(m) = matcher else { return Ok(()) };
        self.keywords += m.keywords.len();
        self.keyword_bytes += m.keywords.iter().map(String::len).sum::<usize>();
        self.regexes += m.regex.iter().count() + m.allow_regex_count();
        self.stopwords += m.stopwords.len() + m.allow_all.iter().map(|a| a.stopwords.len()).sum::<usize>();
        let over = |what: &str, limit: usize, field: Field| {
            Err((field, format!("more than {limit} {what} in one pack: split it into several packs")))
        };
        if self.keywords > MAX_KEYWORDS_PER_PACK {
            return over("keywords", MAX_KEYWORDS_PER_PACK, Field::Keywords);
        }
        if self.keyword_bytes > MAX_KEYWORD_TOTAL_BYTES {
            return over("bytes of keywords", MAX_KEYWORD_TOTAL_BYTES, Field::Keywords);
        }
        if self.regexes > MAX_REGEXES_PER_PACK {
            return over(
                "regexes (allowlists included, gitleaks global ones once per rule)",
                MAX_REGEXES_PER_PACK,
                Field::Regex,
            );
        }
        if self.stopwords > MAX_STOPWORDS_PER_PACK {
            return over("stopwords (gitleaks global ones once per rule)", MAX_STOPWORDS_PER_PACK, Field::Stopwords);
        }
        Ok(())
    }
}

/// What `kernel = true` requires (see "Kernel rules").
fn check_kernel_rule(rule: &Rule) -> Result<(), (Field, String)> {
    let m = &rule.matcher;
    let fail = |why: &str| Err((Field::Kernel, format!("kernel = true: {why}")));
    if rule.action != Action::Block {
        return fail("only block rules go to the kernel (set action = \"block\")");
    }
    if rule.direction == Direction::Response {
        return fail("the kernel sees requests only (direction must be \"request\" or \"both\")");
    }
    if m.keywords.is_empty() {
        return fail("the kernel matches literal keywords: the rule needs `keywords`");
    }
    let extra = [
        (m.regex.is_some(), "regex"),
        (m.prefilter.is_some(), "prefilter"),
        (!m.validators.is_empty(), "validators"),
        (!m.allow_regexes.is_empty(), "allow_regexes"),
        (!m.allow_match_regexes.is_empty(), "allow_match_regexes"),
        (!m.stopwords.is_empty(), "stopwords"),
        (!m.allow_all.is_empty(), "allowlists"),
        (!rule.scope.is_empty(), "scope` (the rule's or [defaults]'"),
    ];
    if let Some((_, key)) = extra.iter().find(|(set, _)| *set) {
        return fail(&format!(
            "the kernel matches literal keywords in the raw request, so `{key}` cannot apply there \
             (remove it, or drop `kernel`)"
        ));
    }
    if let Some(k) =
        m.keywords.iter().find(|k| !k.is_ascii() || !(KERNEL_KEYWORD_MIN..=KERNEL_KEYWORD_MAX).contains(&k.len()))
    {
        return fail(&format!("keyword {k:?} must be {KERNEL_KEYWORD_MIN} to {KERNEL_KEYWORD_MAX} ASCII bytes"));
    }
    if m.keywords.len() > KERNEL_KEYWORDS_MAX {
        return fail(&format!("more than {KERNEL_KEYWORDS_MAX} keywords"));
    }
    Ok(())
}

fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("empty id".into());
    }
    if id.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("id {id:?} has whitespace or control characters"));
    }
    Ok(())
}

/// Byte offset → 1-based line.
pub(crate) struct Lines(Vec<usize>);

impl Lines {
    pub(crate) fn new(text: &str) -> Self {
        Self(std::iter::once(0).chain(memchr::memchr_iter(b'\n', text.as_bytes()).map(|i| i + 1)).collect())
    }

    pub(crate) fn line(&self, offset: usize) -> usize {
        self.0.partition_point(|&start| start <= offset).max(1)
    }
}

/// For a deserialisation error at `offset`: the id of the `[[rules]]` / `[[policies]]`
/// entry it is in, when the text parses as TOML (the error being about meaning). An
/// entry runs from its header to the next top-level table.
pub(crate) fn entry_id_at(text: &str, offset: usize) -> Option<String> {
    let doc = toml::de::DeTable::parse(text).ok()?;
    // (start, id) of every top-level table and array-of-tables entry; id only for rules
    // and policies.
    let mut starts: Vec<(usize, Option<&str>)> = Vec::new();
    for (key, value) in doc.get_ref().iter() {
        let entries_are_ids = ["rules", "policies"].contains(&key.get_ref().as_ref());
        match value.get_ref().as_array() {
            Some(entries) => {
                for entry in entries.iter().filter(|e| e.get_ref().is_table()) {
                    let id =
                        entries_are_ids.then(|| entry.get_ref().get("id").and_then(|v| v.get_ref().as_str())).flatten();
                    starts.push((entry.span().start, id));
                }
            }
            None if value.get_ref().is_table() => starts.push((value.span().start, None)),
            None => {}
        }
    }
    let (_, id) = starts.into_iter().filter(|(start, _)| *start <= offset).max_by_key(|(start, _)| *start)?;
    id.map(str::to_owned)
}

/// A toml error as a [`PackError`], with line and (when inside a rule) rule id.
pub(crate) fn toml_error(text: &str, source: &Path, lines: &Lines, e: &toml::de::Error) -> PackError {
    let span: Option<Range<usize>> = e.span();
    let line = span.as_ref().map(|s| lines.line(s.start));
    let rule = span.and_then(|s| entry_id_at(text, s.start));
    PackError { file: source.to_owned(), line, rule, message: e.message().trim().to_owned() }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    pack: Option<Spanned<RawPack>>,
    #[serde(default)]
    defaults: RawDefaults,
    #[serde(default)]
    rules: Vec<Spanned<RawRule>>,
    #[serde(default)]
    policies: Vec<Spanned<RawPolicy>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPack {
    name: Option<Spanned<String>>,
    version: Option<Spanned<String>>,
    #[allow(dead_code)]
    description: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    action: Option<Action>,
    severity: Option<Severity>,
    direction: Option<Direction>,
    scope: Option<Vec<Scope>>,
    evidence: Option<EvidenceMode>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    id: Spanned<String>,
    category: Category,
    direction: Option<Direction>,
    scope: Option<Spanned<Vec<Scope>>>,
    keywords: Option<Spanned<Vec<String>>>,
    regex: Option<Spanned<String>>,
    secret_group: Option<Spanned<usize>>,
    prefilter: Option<Spanned<Prefilter>>,
    validators: Option<Spanned<Vec<Validator>>>,
    allow_regexes: Option<Spanned<Vec<String>>>,
    allow_match_regexes: Option<Spanned<Vec<String>>>,
    stopwords: Option<Spanned<Vec<String>>>,
    action: Option<Action>,
    severity: Option<Severity>,
    rationale: Option<Spanned<String>>,
    evidence: Option<EvidenceMode>,
    #[serde(default)]
    examples: RawExamples,
    kernel: Option<Spanned<bool>>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExamples {
    #[serde(default)]
    positive: Vec<String>,
    #[serde(default)]
    negative: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    id: Spanned<String>,
    tenant: Option<String>,
    allow_providers: Spanned<Vec<String>>,
    #[serde(default)]
    allow_models: Vec<String>,
    action: Option<Action>,
    severity: Option<Severity>,
    rationale: Option<String>,
}

fn span_of<T>(s: &Option<Spanned<T>>) -> Option<usize> {
    s.as_ref().map(|s| s.span().start)
}

fn parse_native(text: &str, source: &Path) -> Result<Rulepack, PackError> {
    let lines = Lines::new(text);
    let raw: RawFile = toml::from_str(text).map_err(|e| toml_error(text, source, &lines, &e))?;
    let err = |offset: Option<usize>, rule: Option<&str>, msg: String| {
        PackError::new(source, offset.map(|o| lines.line(o)), rule, msg)
    };

    let Some(pack) = raw.pack else {
        return Err(err(None, None, "no [pack] table (with name and version)".into()));
    };
    let pack_at = pack.span().start;
    let pack = pack.into_inner();
    let name = match pack.name {
        Some(n) if !n.get_ref().trim().is_empty() => n.into_inner(),
        Some(n) => return Err(err(Some(n.span().start), None, "empty pack name".into())),
        None => return Err(err(Some(pack_at), None, "[pack] has no name".into())),
    };
    let version = match pack.version {
        Some(v) if !v.get_ref().trim().is_empty() => v.into_inner(),
        Some(v) => return Err(err(Some(v.span().start), None, "empty pack version".into())),
        None => return Err(err(Some(pack_at), None, "[pack] has no version".into())),
    };

    let d = raw.defaults;
    let default_direction = d.direction.unwrap_or(Direction::Both);
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut check_unique = |id: &Spanned<String>| -> Result<(), PackError> {
        let line = lines.line(id.span().start);
        if let Some(first) = seen.insert(id.get_ref().clone(), line) {
            return Err(err(
                Some(id.span().start),
                Some(id.get_ref()),
                format!("duplicate id (first defined at line {first})"),
            ));
        }
        Ok(())
    };

    let mut budget = PackBudget::default();
    let mut rules = Vec::with_capacity(raw.rules.len().min(MAX_RULES_PER_PACK));
    let mut kernel_keywords = 0;
    for spanned in raw.rules {
        let at = spanned.span().start;
        let r = spanned.into_inner();
        let id_at = r.id.span().start;
        check_id(r.id.get_ref()).map_err(|m| err(Some(id_at), Some(r.id.get_ref()), m))?;
        check_unique(&r.id)?;
        let line_of = |field: Field| -> usize {
            let offset = match field {
                Field::Rule => None,
                Field::Id => Some(id_at),
                Field::Keywords => span_of(&r.keywords),
                Field::Regex => span_of(&r.regex),
                Field::SecretGroup => span_of(&r.secret_group),
                Field::Prefilter => span_of(&r.prefilter),
                Field::Validators => span_of(&r.validators),
                Field::AllowRegexes => span_of(&r.allow_regexes),
                Field::AllowMatchRegexes => span_of(&r.allow_match_regexes),
                Field::Stopwords => span_of(&r.stopwords),
                Field::Scope => span_of(&r.scope),
                Field::Rationale => span_of(&r.rationale),
                Field::Kernel => span_of(&r.kernel),
            };
            lines.line(offset.unwrap_or(at))
        };
        let rule = Rule {
            id: r.id.get_ref().clone(),
            category: r.category,
            direction: r.direction.unwrap_or(default_direction),
            scope: r.scope.as_ref().map(|s| s.get_ref().clone()).or_else(|| d.scope.clone()).unwrap_or_default(),
            matcher: Matcher {
                keywords: r.keywords.as_ref().map(|k| k.get_ref().clone()).unwrap_or_default(),
                regex: r.regex.as_ref().map(|x| x.get_ref().clone()),
                secret_group: r.secret_group.as_ref().map_or(0, |g| *g.get_ref()),
                prefilter: r.prefilter.as_ref().map(|p| *p.get_ref()),
                validators: r.validators.as_ref().map(|v| v.get_ref().clone()).unwrap_or_default(),
                allow_regexes: r.allow_regexes.as_ref().map(|v| v.get_ref().clone()).unwrap_or_default(),
                allow_match_regexes: r.allow_match_regexes.as_ref().map(|v| v.get_ref().clone()).unwrap_or_default(),
                stopwords: r.stopwords.as_ref().map(|v| v.get_ref().clone()).unwrap_or_default(),
                allow_all: Vec::new(),
            },
            action: r.action.or(d.action).unwrap_or(Action::Warn),
            severity: r.severity.or(d.severity).unwrap_or(Severity::Sev3),
            rationale: r.rationale.as_ref().map(|x| x.get_ref().trim().to_owned()).unwrap_or_default(),
            evidence: r.evidence.or(d.evidence).unwrap_or_default(),
            examples: Examples { positive: r.examples.positive, negative: r.examples.negative },
            kernel: r.kernel.as_ref().is_some_and(|k| *k.get_ref()),
            line: lines.line(at),
        };
        let checked = check_rule_limits(&rule.matcher)
            .and_then(|()| budget.add(Some(&rule.matcher)))
            .and_then(|()| check_rule(&rule));
        if let Err((field, message)) = checked {
            return Err(PackError::new(source, Some(line_of(field)), Some(&rule.id), message));
        }
        kernel_keywords += if rule.kernel { rule.matcher.keywords.len() } else { 0 };
        if kernel_keywords > KERNEL_KEYWORDS_MAX {
            return Err(PackError::new(
                source,
                Some(line_of(Field::Kernel)),
                Some(&rule.id),
                format!("kernel = true: the pack has more than {KERNEL_KEYWORDS_MAX} kernel keywords"),
            ));
        }
        rules.push(rule);
    }

    let mut policies = Vec::with_capacity(raw.policies.len().min(MAX_RULES_PER_PACK));
    for spanned in raw.policies {
        let at = spanned.span().start;
        let p = spanned.into_inner();
        let id = p.id.get_ref().clone();
        budget.add(None).map_err(|(_, m)| err(Some(at), Some(&id), m))?;
        check_id(&id).map_err(|m| err(Some(p.id.span().start), Some(&id), m))?;
        check_unique(&p.id)?;
        if p.allow_providers.get_ref().is_empty() || p.allow_providers.get_ref().iter().any(|x| x.trim().is_empty()) {
            return Err(err(
                Some(p.allow_providers.span().start),
                Some(&id),
                "allow_providers must list at least one provider, none empty".into(),
            ));
        }
        let rationale = p.rationale.unwrap_or_default().trim().to_owned();
        if rationale.is_empty() {
            return Err(err(Some(at), Some(&id), "a policy needs a rationale".into()));
        }
        let tenant = p.tenant.unwrap_or_else(|| "*".into());
        if tenant.is_empty() {
            return Err(err(Some(at), Some(&id), "empty tenant (use \"*\" for every process)".into()));
        }
        policies.push(ProviderPolicy {
            id,
            tenant,
            allow_providers: p.allow_providers.into_inner(),
            allow_models: p.allow_models,
            action: p.action.or(d.action).unwrap_or(Action::Warn),
            severity: p.severity.or(d.severity).unwrap_or(Severity::Sev3),
            rationale,
            line: lines.line(at),
        });
    }

    Ok(Rulepack { name, version, digest: digest(text.as_bytes()), source: source.to_owned(), rules, policies })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD: &str = "[pack]\nname = \"p\"\nversion = \"1\"\n";

    fn parse_str(text: &str) -> Result<Rulepack, PackError> {
        parse(text, Path::new("t.toml"))
    }

    fn err(text: &str) -> PackError {
        parse_str(text).expect_err("must be rejected")
    }

    /// A valid rule body (after `[[rules]]` and `id`).
    const BODY: &str = "category = \"secret\"\nkeywords = [\"k\"]\nrationale = \"r\"\n";
    /// The same without keywords (for rules that add their own).
    const NOKW: &str = "category = \"secret\"\nrationale = \"r\"\n";

    #[test]
    fn parses_a_full_pack_with_defaults() {
        let text = r#"[pack]
name = "demo"
version = "2026.1"
description = "x"

[defaults]
action = "block"
severity = "SEV-2"
direction = "request"

[[rules]]
id = "a"
category = "secret"
keywords = ["sk-"]
regex = '''sk-([a-z0-9]{8})'''
secret_group = 1
validators = ["luhn", { entropy = { min = 3 } }]
allow_regexes = ['x']
allow_match_regexes = ['y']
stopwords = ["example"]
rationale = "  why  "
examples.positive = ["sk-abcdefgh"]
examples.negative = ["nope"]

[[rules]]
id = "b"
category = "pii"
direction = "response"
scope = ["output"]
prefilter = { digits = 9 }
regex = '[0-9]{9}'
action = "allow"
severity = "SEV-1"
evidence = "full"
rationale = "r"

[[policies]]
id = "pol"
allow_providers = ["openai"]
rationale = "p"
"#;
        let p = parse_str(text).unwrap();
        assert_eq!((p.name.as_str(), p.version.as_str()), ("demo", "2026.1"));
        assert_eq!(p.source, Path::new("t.toml"));
        let a = &p.rules[0];
        assert_eq!(
            (a.line, a.direction, a.action, a.severity),
            (11, Direction::Request, Action::Block, Severity::Sev2)
        );
        assert_eq!(a.rationale, "why");
        assert_eq!(a.matcher.secret_group, 1);
        assert_eq!(a.matcher.validators, vec![Validator::Luhn, Validator::Entropy { min: 3.0 }]);
        assert_eq!(a.matcher.allow_match_regexes, vec!["y"]);
        assert_eq!(a.examples.positive, vec!["sk-abcdefgh"]);
        assert_eq!(a.evidence, EvidenceMode::Redacted);
        let b = &p.rules[1];
        assert_eq!((b.line, b.direction, b.scope.as_slice()), (25, Direction::Response, &[Scope::Output][..]));
        assert_eq!((b.action, b.severity, b.evidence), (Action::Allow, Severity::Sev1, EvidenceMode::Full));
        assert_eq!(b.matcher.prefilter, Some(Prefilter::Digits(9)));
        let pol = &p.policies[0];
        assert_eq!((pol.tenant.as_str(), pol.line, pol.action), ("*", 37, Action::Block));
        assert!(pol.allow_models.is_empty());
    }

    #[test]
    fn builtin_defaults_apply_without_a_defaults_table() {
        let p = parse_str(&format!("{HEAD}[[rules]]\nid = \"a\"\n{BODY}")).unwrap();
        let r = &p.rules[0];
        assert_eq!(
            (r.direction, r.action, r.severity, r.evidence),
            (Direction::Both, Action::Warn, Severity::Sev3, EvidenceMode::Redacted)
        );
        assert!(r.scope.is_empty());
        assert!(p.policies.is_empty());
    }

    #[test]
    fn syntax_errors_have_lines() {
        let e = err(&format!("{HEAD}\n[[rules]]\nid = \"a\n"));
        assert_eq!(e.line, Some(6), "{e}");
        assert_eq!(e.file, Path::new("t.toml"));
        assert!(e.to_string().starts_with("t.toml:6: "), "{e}");
    }

    #[test]
    fn unknown_keys_name_line_and_rule() {
        let e = err(&format!(
            "{HEAD}\n[[rules]]\nid = \"first\"\n{BODY}\n[[rules]]\nid = \"second\"\n{BODY}keywrds = [\"x\"]\n"
        ));
        assert_eq!((e.line, e.rule.as_deref()), (Some(16), Some("second")), "{e}");
        assert!(e.message.contains("unknown field `keywrds`"), "{e}");
        assert_eq!(e.to_string(), format!("t.toml:16: rule second: {}", e.message));
        let e = err(&format!("{HEAD}colour = \"red\"\n"));
        assert_eq!(e.line, Some(4), "{e}");
        let e = err("[pack]\nname = \"p\"\nversion = \"1\"\n[defaults]\nseverity = \"SEV-9\"\n");
        assert_eq!(e.line, Some(5), "{e}");
        assert!(e.message.contains("SEV-9"), "{e}");
    }

    #[test]
    fn wrong_values_name_line_and_rule() {
        let e = err(&format!(
            "{HEAD}[[rules]]\nid = \"cat\"\ncategory = \"secrets\"\nkeywords = [\"k\"]\nrationale = \"r\"\n"
        ));
        assert_eq!((e.line, e.rule.as_deref()), (Some(6), Some("cat")), "{e}");
        assert!(e.message.contains("secrets"), "{e}");
        let e = err(&format!("{HEAD}[[rules]]\nid = \"nocat\"\nkeywords = [\"k\"]\nrationale = \"r\"\n"));
        assert_eq!((e.line, e.rule.as_deref()), (Some(4), Some("nocat")), "{e}");
        assert!(e.message.contains("category"), "{e}");
    }

    #[test]
    fn pack_table_is_required() {
        assert!(
            err("[[rules]]\nid = \"a\"\ncategory = \"secret\"\nkeywords = [\"k\"]\nrationale = \"r\"\n")
                .message
                .contains("[pack]")
        );
        let e = err("[pack]\nversion = \"1\"\n");
        assert_eq!(e.line, Some(1));
        assert!(e.message.contains("no name"), "{e}");
        assert!(err("[pack]\nname = \"p\"\n").message.contains("no version"));
        assert_eq!(err("[pack]\nname = \"\"\nversion = \"1\"\n").line, Some(2));
        assert!(err("[pack]\nname = \"p\"\nversion = 2\n").message.contains("string"));
    }

    #[test]
    fn duplicate_and_empty_ids() {
        let e = err(&format!("{HEAD}[[rules]]\nid = \"a\"\n{BODY}[[rules]]\nid = \"a\"\n{BODY}"));
        assert_eq!((e.line, e.rule.as_deref()), (Some(10), Some("a")), "{e}");
        assert!(e.message.contains("duplicate id (first defined at line 5)"), "{e}");
        let e = err(&format!(
            "{HEAD}[[rules]]\nid = \"a\"\n{BODY}[[policies]]\nid = \"a\"\nallow_providers = [\"x\"]\nrationale = \"r\"\n"
        ));
        assert_eq!((e.line, e.rule.as_deref()), (Some(10), Some("a")), "{e}");
        let e = err(&format!("{HEAD}[[rules]]\nid = \"\"\n{BODY}"));
        assert_eq!((e.line, e.message.as_str()), (Some(5), "empty id"));
        assert!(err(&format!("{HEAD}[[rules]]\nid = \"a b\"\n{BODY}")).message.contains("whitespace"));
    }

    /// Rejections of one rule: (extra lines after the id, line of the error, message part).
    #[test]
    fn rule_checks_point_at_the_key() {
        let cases: &[(&str, usize, &str)] = &[
            ("category = \"secret\"\nrationale = \"r\"\n", 4, "needs `keywords`, a `regex`"),
            ("category = \"secret\"\nkeywords = [\"\"]\nrationale = \"r\"\n", 7, "empty keyword"),
            ("category = \"secret\"\nkeywords = [\"k\"]\n", 4, "rationale"),
            ("category = \"secret\"\nkeywords = [\"k\"]\nrationale = \" \"\n", 8, "rationale"),
            (
                "category = \"secret\"\n\nregex = \"(unclosed\"\nrationale = \"r\"\n",
                8,
                "invalid regex: unclosed group (at column 1)",
            ),
            ("category = \"secret\"\nregex = '(?:\\w{100}){100}'\nrationale = \"r\"\n", 7, "regex too large"),
            (
                "category = \"secret\"\nregex = 'a(b)'\nsecret_group = 2\nrationale = \"r\"\n",
                8,
                "secret_group 2 but the regex has 1 capture group",
            ),
            (
                "category = \"secret\"\nkeywords = [\"k\"]\nsecret_group = 1\nrationale = \"r\"\n",
                8,
                "secret_group needs a regex",
            ),
            (
                "category = \"secret\"\ndirection = \"request\"\nscope = [\"user\", \"output\"]\nkeywords = [\"k\"]\nrationale = \"r\"\n",
                8,
                "scope \"output\" never occurs in direction \"request\"",
            ),
            (
                "category = \"secret\"\ndirection = \"response\"\nscope = [\"system\"]\nkeywords = [\"k\"]\nrationale = \"r\"\n",
                8,
                "scope \"system\" never occurs",
            ),
            (
                "category = \"secret\"\nkeywords = [\"k\"]\nvalidators = [{ entropy = { min = 9.5 } }]\nrationale = \"r\"\n",
                8,
                "entropy min 9.5 is outside 0..=8",
            ),
            (
                "category = \"secret\"\nkeywords = [\"k\"]\nvalidators = [\"crc\"]\nrationale = \"r\"\n",
                8,
                "unknown variant `crc`",
            ),
            (
                "category = \"secret\"\nregex = 'x'\nkeywords = [\"k\"]\nprefilter = { digits = 3 }\nrationale = \"r\"\n",
                9,
                "exclude each other",
            ),
            (
                "category = \"secret\"\nkeywords = [\"k\"]\nprefilter = { digits = 3 }\nrationale = \"r\"\n",
                8,
                "`prefilter` needs a `regex`",
            ),
            ("category = \"secret\"\nregex = 'x'\nprefilter = { digits = 0 }\nrationale = \"r\"\n", 8, "within 1..=64"),
            (
                "category = \"secret\"\nkeywords = [\"k\"]\nallow_regexes = ['[z']\nrationale = \"r\"\n",
                8,
                "allowlist: invalid regex",
            ),
            ("category = \"secret\"\nkeywords = [\"k\"]\nstopwords = [\"\"]\nrationale = \"r\"\n", 8, "empty stopword"),
        ];
        for (body, line, part) in cases {
            let e = err(&format!("{HEAD}[[rules]]\nid = \"r1\"\n{body}"));
            assert_eq!((e.line, e.rule.as_deref()), (Some(*line), Some("r1")), "{body}: {e}");
            assert!(e.message.contains(part), "{body}: {e}");
        }
    }

    #[test]
    fn kernel_rules_are_literal_keyword_block_rules() {
        let ok = format!(
            "{HEAD}[[rules]]\nid = \"k\"\ncategory = \"jailbreak\"\naction = \"block\"\ndirection = \"request\"\nkeywords = [\"Ignore-All-Rules\"]\nrationale = \"r\"\nkernel = true\n"
        );
        let p = parse_str(&ok).unwrap();
        assert!(p.rules[0].kernel);
        assert!(!parse_str(&format!("{HEAD}[[rules]]\nid = \"a\"\n{BODY}")).unwrap().rules[0].kernel);

        // (rule body after the id, message part); the error points at `kernel`.
        let block = "category = \"secret\"\naction = \"block\"\nrationale = \"r\"\n";
        let cases: &[(String, &str)] = &[
            (
                "category = \"secret\"\nkeywords = [\"abcd\"]\nrationale = \"r\"\nkernel = true\n".to_owned(),
                "only block rules",
            ),
            (format!("{block}keywords = [\"abcd\"]\nkernel = true\ndirection = \"response\"\n"), "requests only"),
            (format!("{block}regex = 'abcd'\nkernel = true\n"), "needs `keywords`"),
            (format!("{block}keywords = [\"abcd\"]\nkernel = true\nregex = 'abcd'\n"), "`regex` cannot apply"),
            (format!("{block}keywords = [\"abcd\"]\nkernel = true\nvalidators = [\"luhn\"]\n"), "`validators`"),
            (format!("{block}keywords = [\"abcd\"]\nkernel = true\nstopwords = [\"x\"]\n"), "`stopwords`"),
            (format!("{block}keywords = [\"abcd\"]\nkernel = true\nscope = [\"user\"]\n"), "`scope`"),
            (format!("{block}keywords = [\"abc\"]\nkernel = true\n"), "keyword \"abc\" must be 4 to 32 ASCII bytes"),
            (format!("{block}keywords = [\"ignoré\"]\nkernel = true\n"), "ASCII bytes"),
            (format!("{block}keywords = [\"{}\"]\nkernel = true\n", "x".repeat(33)), "4 to 32 ASCII"),
        ];
        for (body, part) in cases {
            let text = format!("{HEAD}[[rules]]\nid = \"r1\"\n{body}");
            let kernel_line = text.lines().position(|l| l.starts_with("kernel")).unwrap() + 1;
            let e = err(&text);
            assert_eq!((e.line, e.rule.as_deref()), (Some(kernel_line), Some("r1")), "{body}: {e}");
            assert!(e.message.starts_with("kernel = true: ") && e.message.contains(part), "{body}: {e}");
        }
        // A block action from [defaults] counts.
        let d = format!(
            "{HEAD}[defaults]\naction = \"block\"\n[[rules]]\nid = \"d\"\ncategory = \"secret\"\nkeywords = [\"abcd\"]\nrationale = \"r\"\nkernel = true\n"
        );
        assert!(parse_str(&d).unwrap().rules[0].kernel);
        let e = err(&format!("{HEAD}[[rules]]\nid = \"t\"\n{BODY}kernel = \"yes\"\n"));
        assert_eq!((e.line, e.rule.as_deref()), (Some(9), Some("t")), "{e}");

        // 33 keywords over two rules: the second rule is refused.
        let kws = |r: std::ops::Range<usize>| r.map(|i| format!("\"kw-{i:02}\"")).collect::<Vec<_>>().join(", ");
        let e = err(&format!(
            "{HEAD}[[rules]]\nid = \"a\"\n{block}keywords = [{}]\nkernel = true\n[[rules]]\nid = \"b\"\n{block}keywords = [{}]\nkernel = true\n",
            kws(0..30),
            kws(30..33)
        ));
        assert_eq!((e.line, e.rule.as_deref()), (Some(17), Some("b")), "{e}");
        assert!(e.message.contains("more than 32 kernel keywords"), "{e}");
    }

    #[test]
    fn scope_default_is_checked_against_the_rule_direction() {
        let e = err(&format!(
            "{HEAD}[defaults]\nscope = [\"output\"]\n[[rules]]\nid = \"a\"\ndirection = \"request\"\n{BODY}"
        ));
        assert_eq!((e.line, e.rule.as_deref()), (Some(6), Some("a")), "{e}");
    }

    #[test]
    fn policy_checks() {
        let e = err(&format!("{HEAD}[[policies]]\nid = \"p1\"\nallow_providers = []\nrationale = \"r\"\n"));
        assert_eq!((e.line, e.rule.as_deref()), (Some(6), Some("p1")), "{e}");
        assert!(e.message.contains("at least one provider"), "{e}");
        let e = err(&format!("{HEAD}[[policies]]\nid = \"p1\"\nallow_providers = [\"openai\"]\n"));
        assert!(e.message.contains("rationale"), "{e}");
        let e = err(&format!("{HEAD}[[policies]]\nid = \"p1\"\nrationale = \"r\"\n"));
        assert!(e.message.contains("allow_providers"), "{e}");
        assert_eq!(e.rule.as_deref(), Some("p1"));
    }

    #[test]
    fn digest_is_stable_and_follows_content() {
        let text = format!("{HEAD}[[rules]]\nid = \"a\"\n{BODY}");
        let a = parse_str(&text).unwrap().digest;
        assert_eq!(a, parse_str(&text).unwrap().digest);
        assert_eq!(a.len(), "sha256:".len() + 64);
        assert_eq!(digest(b""), "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        assert_ne!(a, parse_str(&format!("{text}# comment\n")).unwrap().digest);
    }

    #[test]
    fn load_reads_files_and_reports_missing_ones() {
        let e = load(Path::new("/nonexistent/pack.toml")).unwrap_err();
        assert!(e.to_string().starts_with("/nonexistent/pack.toml: cannot read"), "{e}");
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/rules/default.toml");
        let p = load(&path).unwrap();
        assert_eq!(p.name, "aegis-default");
        assert_eq!(p.digest, digest(&std::fs::read(&path).unwrap()));
        for r in &p.rules {
            assert!(r.examples.positive.len() >= 2 && r.examples.negative.len() >= 2, "{}", r.id);
        }
        assert_eq!(p.policies.len(), 1);
    }

    /// `n` distinct keywords as a TOML array.
    fn keywords(n: usize, tag: &str) -> String {
        let list: Vec<String> = (0..n).map(|i| format!("\"{tag}{i:06}\"")).collect();
        format!("[{}]", list.join(", "))
    }

    #[test]
    fn oversized_rules_are_refused_before_compiling() {
        // The reported pack: one rule with 200,000 keywords never finished loading.
        let t = std::time::Instant::now();
        let e = err(&format!("{HEAD}[[rules]]\nid = \"huge\"\n{NOKW}keywords = {}\n", keywords(200_000, "kw")));
        assert_eq!((e.line, e.rule.as_deref()), (Some(8), Some("huge")), "{e}");
        assert!(e.message.starts_with("200000 keywords, over the limit of 256 per rule: split the rule"), "{e}");
        assert!(t.elapsed() < std::time::Duration::from_secs(30), "refused in {:?}", t.elapsed());
        parse_str(&format!("{HEAD}[[rules]]\nid = \"max\"\n{NOKW}keywords = {}\n", keywords(256, "kw"))).unwrap();

        // (extra keys of one rule, line of the error, message part).
        let long = |n: usize| "x".repeat(n);
        let allow: Vec<String> = (0..64).map(|i| format!("'a{i}'")).collect();
        let cases: Vec<(String, usize, String)> = vec![
            (format!("keywords = [\"{}\"]\n", long(257)), 8, "a keyword of 257 bytes, over the limit of 256".into()),
            (format!("regex = '{}'\n", long(4097)), 8, "a regex of 4097 bytes, over the limit of 4096".into()),
            (format!("allow_regexes = ['{}']\n", long(4097)), 8, "a regex of 4097 bytes".into()),
            (
                format!("regex = 'x'\nallow_regexes = [{}]\n", allow.join(", ")),
                9,
                "65 regexes (regex and allowlists), over the limit of 64 per rule".into(),
            ),
            (
                format!("stopwords = {}\n", keywords(4097, "s")),
                8,
                "4097 stopwords, over the limit of 4096 per rule".into(),
            ),
        ];
        for (extra, line, part) in &cases {
            let e = err(&format!("{HEAD}[[rules]]\nid = \"r1\"\n{NOKW}{extra}"));
            assert_eq!((e.line, e.rule.as_deref()), (Some(*line), Some("r1")), "{extra}: {e}");
            assert!(e.message.contains(part.as_str()), "{e}");
        }
    }

    #[test]
    fn oversized_packs_are_refused_at_the_rule_that_crosses_the_limit() {
        // 17 rules of 256 keywords: the 17th crosses 4096.
        let mut text = HEAD.to_owned();
        for r in 0..17 {
            text += &format!("[[rules]]\nid = \"r{r}\"\n{NOKW}keywords = {}\n", keywords(256, &format!("k{r}-")));
        }
        let e = err(&text);
        assert_eq!((e.line, e.rule.as_deref()), (Some(4 + 16 * 5 + 4), Some("r16")), "{e}");
        assert_eq!(e.message, "more than 4096 keywords in one pack: split it into several packs");
        // 4,097 rules and policies.
        let mut text = HEAD.to_owned();
        for r in 0..4096 {
            text += &format!("[[rules]]\nid = \"r{r}\"\n{BODY}");
        }
        text += "[[policies]]\nid = \"p\"\nallow_providers = [\"openai\"]\nrationale = \"r\"\n";
        let e = err(&text);
        assert_eq!(e.rule.as_deref(), Some("p"), "{e}");
        assert!(e.message.starts_with("more than 4096 rules and policies in one pack"), "{e}");
        // Keyword bytes: 2 rules of 256 keywords of 256 bytes is 128 KiB; 5 rules cross 256 KiB.
        let mut text = HEAD.to_owned();
        for r in 0..5 {
            let list: Vec<String> = (0..256).map(|i| format!("\"{r}-{i:03}-{}\"", "k".repeat(248))).collect();
            text += &format!("[[rules]]\nid = \"r{r}\"\n{NOKW}keywords = [{}]\n", list.join(","));
        }
        let e = err(&text);
        assert_eq!(e.rule.as_deref(), Some("r4"), "{e}");
        assert_eq!(e.message, "more than 262144 bytes of keywords in one pack: split it into several packs");
    }

    #[test]
    fn pack_files_are_read_bounded() {
        let dir = std::env::temp_dir().join(format!("aegis-pack-read-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let big = dir.join("big.toml");
        let mut text = format!("{HEAD}[[rules]]\nid = \"a\"\n{BODY}");
        text.push_str(&"#".repeat(MAX_PACK_BYTES as usize));
        std::fs::write(&big, &text).unwrap();
        let e = load(&big).unwrap_err();
        assert_eq!((e.line, e.rule.as_deref()), (None, None));
        assert!(
            e.message.starts_with("cannot read the pack: it has ")
                && e.message.ends_with("over the limit of 8388608 bytes: split it into several packs"),
            "{e}"
        );
        // /dev/zero grew the agent's memory until it was killed; a FIFO blocked forever.
        let e = load(Path::new("/dev/zero")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "/dev/zero: cannot read the pack: it is a character device, not a regular file: give the path of a \
             regular file"
        );
        let fifo = dir.join("fifo.toml");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let path = fifo.clone();
        std::thread::spawn(move || tx.send(load(&path).map(|_| ())));
        let e = rx.recv_timeout(std::time::Duration::from_secs(5)).expect("did not block").unwrap_err();
        assert!(e.message.contains("it is a FIFO (named pipe), not a regular file"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn lines_map_offsets() {
        let l = Lines::new("a\nbc\n\nd");
        assert_eq!([0, 1, 2, 4, 5, 6].map(|o| l.line(o)), [1, 1, 2, 2, 3, 4]);
    }
}
