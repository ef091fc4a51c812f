//! gitleaks TOML rule files (the v8 config format) as rulepacks.
//!
//! A team that already curates gitleaks rules can point the agent at the same file. What
//! is read, and how it maps:
//!
//! | gitleaks | rulepack |
//! | --- | --- |
//! | `title` | pack name (else the file stem); version is `"gitleaks"` |
//! | `[[rules]]` `id`, `description` | rule id; rationale (else "gitleaks rule <id>") |
//! | `regex` | `regex`, translated from Go RE2 (below) |
//! | `secretGroup` | `secret_group` (unset: group 1 if the regex has groups, as gitleaks takes the first) |
//! | `entropy` | an `entropy` validator on the secret |
//! | `keywords` | `keywords` |
//! | `[rules.allowlist]`, `[[rules.allowlists]]` | that rule's allowlists |
//! | `[allowlist]`, `[[allowlists]]` (with `targetRules`) | every (listed) rule's allowlists |
//! | allowlist `regexes` with `regexTarget` `"secret"` (default) / `"match"` / `"line"` | `allow_regexes` / `allow_match_regexes` / `allow_match_regexes` (no line in traffic: the match stands for it) |
//! | allowlist `stopwords` | `stopwords` |
//! | allowlist `condition = "AND"` with both `regexes` and `stopwords` | one `allow_all` entry: a secret is allowed only when a regex matches *and* it contains a stopword (with the default `"OR"`, or only one of the two, either one suffices, as in gitleaks) |
//!
//! Every rule becomes category `secret`, direction `both` (a secret in a prompt leaks to
//! the provider; one in an output leaks to the user), every scope, action `warn`, severity
//! `SEV-2`, redacted evidence. No examples: `rules test` has nothing to run for them.
//!
//! What does not apply to network traffic is left out: `path` (a rule with a `path` is
//! skipped, since it can only match in files of that path; the count is logged),
//! allowlist `paths` and `commits` (an allowlist with `condition = "AND"` that has any is
//! dropped, since it could never be satisfied; otherwise its regexes and stopwords apply),
//! `tags`, `[extend]` (the gitleaks built-in config cannot be
//! fetched offline and other files are not followed: load them as packs of their own; it is
//! logged). Other unknown keys are ignored, for configs of newer gitleaks versions.
//!
//! # Regexes
//!
//! gitleaks regexes are Go RE2, which the Rust `regex` crate reads almost unchanged. Two
//! differences are translated: in Go `\w`, `\d`, `\s` and `\b` are ASCII (in Rust they are
//! Unicode, and the generic rules' `[\w.-]{0,150}` would then exceed the size limit), and
//! `\Q…\E` quoting (absent from Rust) is expanded. Anything else Rust does not read is an
//! error naming the rule.
//!
//! The engine matches lower-cased text, and gitleaks rules are written for the original
//! case (`AKIA[0-9A-Z]{16}`); like every rule they are compiled case-insensitively, so they
//! keep finding what they found. The trade-off: a pattern that relied on case to tell a
//! secret from ordinary text (`[A-Z0-9]{20}`) also matches the lower- and mixed-case
//! strings it used to skip; entropy thresholds and allowlists still filter them, and the
//! entropy is computed on the original-case secret when it can be located in the input.

use std::path::Path;

use serde::Deserialize;
use toml::Spanned;

use super::pack::{
    Action, AllowAll, Category, Direction, EvidenceMode, Examples, Lines, Matcher, PackBudget, PackError, Rule,
    Rulepack, Severity, Validator, check_rule, check_rule_limits, compile_regex, digest, toml_error,
};

/// True when `text` looks like a gitleaks config (top-level `[[rules]]` with `regex`,
/// no AegisPlane `[pack]` table).
pub fn looks_like_gitleaks(text: &str) -> bool {
    let Ok(doc) = toml::de::DeTable::parse(text) else {
        return false;
    };
    let doc = doc.get_ref();
    if doc.get("pack").is_some() {
        return false;
    }
    let Some(rules) = doc.get("rules").and_then(|r| r.get_ref().as_array()) else {
        return false;
    };
    let tables = || rules.iter().filter_map(|r| r.get_ref().as_table());
    // AegisPlane-only keys: a native pack that merely lacks [pack] is reported as such.
    let native = tables().any(|t| ["category", "rationale", "action", "severity"].iter().any(|k| t.get(*k).is_some()));
    !native && tables().any(|t| t.get("regex").is_some() || t.get("path").is_some())
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Config {
    title: Option<String>,
    extend: Option<toml::Value>,
    allowlist: Option<Allowlist>,
    #[serde(default)]
    allowlists: Vec<Allowlist>,
    #[serde(default)]
    rules: Vec<Spanned<GlRule>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GlRule {
    id: Option<String>,
    description: Option<String>,
    regex: Option<String>,
    #[serde(default)]
    secret_group: usize,
    entropy: Option<f64>,
    #[serde(default)]
    keywords: Vec<String>,
    path: Option<String>,
    allowlist: Option<Allowlist>,
    #[serde(default)]
    allowlists: Vec<Allowlist>,
}

#[derive(Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Allowlist {
    condition: Option<String>,
    regex_target: Option<String>,
    #[serde(default)]
    regexes: Vec<String>,
    #[serde(default)]
    stopwords: Vec<String>,
    #[serde(default)]
    paths: Vec<String>,
    #[serde(default)]
    commits: Vec<String>,
    /// Global `[[allowlists]]` only: the rules it applies to (empty: all).
    #[serde(default)]
    target_rules: Vec<String>,
}

impl Allowlist {
    /// Add what applies to traffic to `m`; `Err` for a bad `regexTarget`.
    fn apply(&self, m: &mut Matcher) -> Result<(), String> {
        let and = self.condition.as_deref().is_some_and(|c| c.eq_ignore_ascii_case("and"));
        if and && (!self.paths.is_empty() || !self.commits.is_empty()) {
            return Ok(()); // needs a path or commit to match: never in traffic
        }
        let on_match = match self.regex_target.as_deref().unwrap_or("secret") {
            "secret" | "" => false,
            "match" | "line" => true,
            other => {
                return Err(format!("allowlist regexTarget {other:?} (expected secret, match or line)"));
            }
        };
        let regexes: Vec<String> = self.regexes.iter().map(|r| go_regex_to_rust(r)).collect();
        let stopwords: Vec<String> = self.stopwords.iter().filter(|s| !s.is_empty()).cloned().collect();
        if and && !regexes.is_empty() && !stopwords.is_empty() {
            m.allow_all.push(AllowAll { regexes, on_match, stopwords });
            return Ok(());
        }
        let target = if on_match { &mut m.allow_match_regexes } else { &mut m.allow_regexes };
        target.extend(regexes);
        m.stopwords.extend(stopwords);
        Ok(())
    }
}

/// Convert a gitleaks config into a rulepack (category secret; action and severity from
/// the defaults documented in the README).
pub fn parse(text: &str, source: &Path) -> Result<Rulepack, PackError> {
    let lines = Lines::new(text);
    let config: Config = toml::from_str(text).map_err(|e| toml_error(text, source, &lines, &e))?;
    if config.extend.is_some() {
        tracing::warn!(file = %source.display(), "gitleaks [extend] ignored: load the extended config as a pack of its own");
    }
    let global: Vec<&Allowlist> = config.allowlist.iter().chain(&config.allowlists).collect();
    let mut rules: Vec<Rule> = Vec::new();
    let mut budget = PackBudget::default();
    let mut skipped = 0usize;
    for spanned in &config.rules {
        let line = lines.line(spanned.span().start);
        let r = spanned.get_ref();
        let id = r.id.clone().unwrap_or_default();
        let fail = |msg: String| PackError::new(source, Some(line), (!id.is_empty()).then_some(id.as_str()), msg);
        if id.is_empty() {
            return Err(fail("rule has no id".into()));
        }
        if r.path.is_some() {
            skipped += 1;
            continue;
        }
        let Some(regex) = r.regex.as_deref() else {
            return Err(fail("rule has neither regex nor path".into()));
        };
        if rules.iter().any(|x| x.id == id) {
            return Err(fail("duplicate rule id".into()));
        }
        let mut matcher = Matcher {
            keywords: r.keywords.iter().map(|k| k.to_lowercase()).collect(),
            regex: Some(go_regex_to_rust(regex)),
            secret_group: r.secret_group,
            validators: r.entropy.map(|min| vec![Validator::Entropy { min }]).unwrap_or_default(),
            ..Matcher::default()
        };
        let own = r.allowlist.iter().chain(&r.allowlists);
        let shared = global.iter().copied().filter(|a| a.target_rules.is_empty() || a.target_rules.contains(&id));
        for a in own.chain(shared) {
            a.apply(&mut matcher).map_err(fail)?;
        }
        // Global allowlists are copied into every rule: the limits are checked for the
        // whole pack before any regex is compiled (below).
        check_rule_limits(&matcher).and_then(|()| budget.add(Some(&matcher))).map_err(|(_, m)| fail(m))?;
        let rationale = match r.description.as_deref().map(str::trim) {
            Some(d) if !d.is_empty() => d.to_owned(),
            _ => format!("gitleaks rule {id}"),
        };
        let rule = Rule {
            id,
            category: Category::Secret,
            direction: Direction::Both,
            scope: Vec::new(),
            matcher,
            action: Action::Warn,
            severity: Severity::Sev2,
            rationale,
            evidence: EvidenceMode::Redacted,
            examples: Examples::default(),
            kernel: false,
            line,
        };
        rules.push(rule);
    }
    for rule in &mut rules {
        // gitleaks without secretGroup takes the first capture group as the secret.
        let m = &mut rule.matcher;
        if m.secret_group == 0 {
            let groups = m.regex.as_deref().and_then(|re| compile_regex(re).ok()).map_or(1, |re| re.captures_len());
            m.secret_group = usize::from(groups > 1);
        }
        if let Err((_, message)) = check_rule(rule) {
            return Err(PackError::new(source, Some(rule.line), Some(&rule.id), message));
        }
    }
    if skipped > 0 {
        tracing::info!(file = %source.display(), skipped, "gitleaks rules with a `path` skipped: paths do not exist in traffic");
    }
    let name = config
        .title
        .filter(|t| !t.trim().is_empty())
        .or_else(|| source.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "gitleaks".into());
    Ok(Rulepack {
        name,
        version: "gitleaks".into(),
        digest: digest(text.as_bytes()),
        source: source.to_owned(),
        rules,
        policies: Vec::new(),
    })
}

/// Go RE2 → Rust `regex`: `\w \d \s \b` (and negations) made ASCII as in Go, `\Q…\E`
/// expanded. Everything else is passed through. Public for the fuzz targets.
pub fn go_regex_to_rust(pattern: &str) -> String {
    let mut out = String::with_capacity(pattern.len() + 16);
    let mut chars = pattern.chars().peekable();
    // Inside a bracket class: `[` count (POSIX `[:alpha:]` excluded).
    let mut class_depth = 0usize;
    // Just after `[` or `[^`: a `]` there is a literal.
    let mut class_start = false;
    while let Some(c) = chars.next() {
        let at_class_start = std::mem::replace(&mut class_start, false);
        match c {
            '\\' => {
                let Some(e) = chars.next() else {
                    out.push('\\');
                    break;
                };
                let inside = class_depth > 0;
                match (e, inside) {
                    ('w', false) => out.push_str("[0-9A-Za-z_]"),
                    ('w', true) => out.push_str("0-9A-Za-z_"),
                    ('W', false) => out.push_str("[^0-9A-Za-z_]"),
                    ('W', true) => out.push_str("[:^word:]"),
                    ('d', false) => out.push_str("[0-9]"),
                    ('d', true) => out.push_str("0-9"),
                    ('D', false) => out.push_str("[^0-9]"),
                    ('D', true) => out.push_str("[:^digit:]"),
                    ('s', false) => out.push_str(r"[\t\n\f\r ]"),
                    ('s', true) => out.push_str(r"\t\n\f\r "),
                    ('S', false) => out.push_str(r"[^\t\n\f\r ]"),
                    ('S', true) => out.push_str("[:^space:]"),
                    ('b', false) => out.push_str(r"(?-u:\b)"),
                    ('B', false) => out.push_str(r"(?-u:\B)"),
                    ('Q', false) => {
                        let mut literal = String::new();
                        while let Some(q) = chars.next() {
                            if q == '\\' && chars.peek() == Some(&'E') {
                                chars.next();
                                break;
                            }
                            literal.push(q);
                        }
                        out.push_str(&regex::escape(&literal));
                    }
                    (e, _) => {
                        out.push('\\');
                        out.push(e);
                    }
                }
            }
            '[' if class_depth > 0 && chars.peek() == Some(&':') => {
                // POSIX class `[:name:]` inside a bracket class: copy through `:]`.
                out.push('[');
                let mut prev = '\0';
                for p in chars.by_ref() {
                    out.push(p);
                    if prev == ':' && p == ']' {
                        break;
                    }
                    prev = p;
                }
            }
            // A `[` inside a class is a literal in Go, a nested class in Rust.
            '[' if class_depth > 0 => out.push_str(r"\["),
            '[' => {
                class_depth += 1;
                out.push('[');
                if chars.peek() == Some(&'^') {
                    chars.next();
                    out.push('^');
                }
                class_start = true;
            }
            ']' if class_depth > 0 && !at_class_start => {
                class_depth -= 1;
                out.push(']');
            }
            _ => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::rules::{
        engine::{Engine, Finding},
        normalize::NormalizeLimits,
        pack::Scope,
    };

    fn fixture() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/rules/gitleaks-secrets.toml")
    }

    fn engine(pack: Rulepack) -> Engine {
        Engine::compile(vec![pack], NormalizeLimits::default()).unwrap()
    }

    fn ids(e: &Engine, text: &str) -> Vec<String> {
        let mut out: Vec<Finding> = Vec::new();
        e.scan(text.as_bytes(), Direction::Request, Scope::User, &mut out);
        let mut ids: Vec<String> = out.iter().map(|f| e.rule(f.rule).id.clone()).collect();
        ids.sort();
        ids.dedup();
        ids
    }

    #[test]
    fn recognises_gitleaks_configs() {
        let text = std::fs::read_to_string(fixture()).unwrap();
        assert!(looks_like_gitleaks(&text));
        assert!(looks_like_gitleaks("[[rules]]\nid = \"a\"\nregex = 'x'\n"));
        assert!(!looks_like_gitleaks("[pack]\nname = \"p\"\nversion = \"1\"\n[[rules]]\nid = \"a\"\nregex = 'x'\n"));
        // A native pack that forgot [pack] is not mistaken for gitleaks.
        assert!(!looks_like_gitleaks("[[rules]]\nid = \"a\"\ncategory = \"secret\"\nregex = 'x'\n"));
        assert!(!looks_like_gitleaks("[[rules]\n"));
        assert!(!looks_like_gitleaks("title = \"x\"\n"));
    }

    #[test]
    fn fixture_loads_with_its_rules_and_allowlists() {
        let pack = crate::rules::pack::load(&fixture()).unwrap();
        assert_eq!(pack.name, "AegisPlane gitleaks example");
        assert_eq!(pack.version, "gitleaks");
        assert!(pack.digest.starts_with("sha256:"));
        // 18 rules in the file, one of them path-only (skipped).
        assert_eq!(pack.rules.len(), 17, "{:?}", pack.rules.iter().map(|r| &r.id).collect::<Vec<_>>());
        let aws = pack.rules.iter().find(|r| r.id == "aws-access-token").unwrap();
        assert_eq!(
            (aws.category, aws.direction, aws.action, aws.severity),
            (Category::Secret, Direction::Both, Action::Warn, Severity::Sev2)
        );
        assert!(aws.rationale.contains("AWS"));
        // Global allowlist merged into every rule; the rule's own stopwords too.
        assert!(aws.matcher.allow_regexes.iter().any(|r| r.contains("EXAMPLE")), "{:?}", aws.matcher);
        let generic = pack.rules.iter().find(|r| r.id == "generic-api-key").unwrap();
        assert_eq!(generic.matcher.secret_group, 1);
        assert_eq!(generic.matcher.validators, vec![Validator::Entropy { min: 3.5 }]);
        assert!(generic.matcher.stopwords.iter().any(|s| s == "changeme"));
        assert!(!generic.matcher.allow_match_regexes.is_empty());
        assert!(!generic.matcher.regex.as_deref().unwrap().contains(r"\w"), "\\w must be made ASCII");
        assert_eq!(pack.rules.iter().find(|r| r.id == "openai-api-key").unwrap().matcher.keywords, vec!["sk-"]);
    }

    #[test]
    fn fixture_detects_fake_secrets_and_honours_allowlists() {
        let e = engine(crate::rules::pack::load(&fixture()).unwrap());
        assert_eq!(ids(&e, "aws key AKIAZ7Q4M2LXWP3KERTD in the config"), vec!["aws-access-token"]);
        // gitleaks' own allowlist convention: keys ending in EXAMPLE are documentation.
        assert!(ids(&e, "aws key AKIAIOSFODNN7EXAMPLE in the docs").is_empty());
        assert_eq!(ids(&e, "token ghp_4Fq8ZtX1mB7cK2pL9sV3nW6yR0dJ5hG8aQ2e"), vec!["github-pat"]);
        assert_eq!(ids(&e, "STRIPE=sk_live_4eC39HqLyjWDarjtT1zdp7dc9"), vec!["stripe-access-token"]);
        assert_eq!(ids(&e, "google maps AIzaSyD3v9Xq2Lm8Rt5Kp1Wz7Yb4Nc6Hf0Jg2Se"), vec!["gcp-api-key"]);
        assert_eq!(
            ids(
                &e,
                "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW\n-----END OPENSSH PRIVATE KEY-----"
            ),
            vec!["private-key"]
        );
        // Generic: secret group + entropy + stopwords.
        assert_eq!(ids(&e, "api_key = \"Zq8xT2mV9pL4kR7wN3bY6cH1\""), vec!["generic-api-key"]);
        assert!(ids(&e, "api_key = \"aaaaaaaaaaaaaaaaaaaaaaaa\"").is_empty(), "low entropy");
        assert!(ids(&e, "api_key = \"changeme-Zq8xT2mV9pL4kR7w\"").is_empty(), "stopword");
        assert!(ids(&e, "What is the capital of France?").is_empty());
    }

    #[test]
    fn errors_name_the_rule_and_line() {
        let p = Path::new("gl.toml");
        let e = parse(
            "title = \"t\"\n\n[[rules]]\nid = \"ok\"\nregex = 'abc'\n\n[[rules]]\nid = \"bad\"\nregex = '(abc'\n",
            p,
        )
        .unwrap_err();
        assert_eq!((e.line, e.rule.as_deref()), (Some(7), Some("bad")), "{e}");
        assert!(e.message.contains("unclosed group"), "{e}");
        let e = parse("[[rules]]\nid = \"a\"\nregex = 'a(b)'\nsecretGroup = 2\n", p).unwrap_err();
        assert!(e.message.contains("secret_group 2"), "{e}");
        let e = parse("[[rules]]\nid = \"a\"\nregex = 'ab'\n[[rules]]\nid = \"a\"\nregex = 'cd'\n", p).unwrap_err();
        assert_eq!((e.line, e.message.as_str()), (Some(4), "duplicate rule id"));
        let e = parse(
            "[[rules]]\nid = \"a\"\nregex = 'abc'\n[rules.allowlist]\nregexTarget = \"file\"\nregexes = ['x']\n",
            p,
        )
        .unwrap_err();
        assert!(e.message.contains("regexTarget"), "{e}");
    }

    #[test]
    fn path_rules_extend_and_and_allowlists() {
        let text = r#"
title = "t"
[extend]
useDefault = true
[[rules]]
id = "pkcs12-file"
path = '''\.p12$'''
[[rules]]
id = "tok"
regex = '''tok_[a-z]{8}'''
keywords = ["TOK_"]
[[rules.allowlists]]
condition = "AND"
paths = ['''test/''']
regexes = ['''tok_aaaaaaaa''']
[[rules.allowlists]]
regexTarget = "match"
regexes = ['''^tok_bbbb''']
[[allowlists]]
targetRules = ["other"]
stopwords = ["cccc"]
"#;
        let pack = parse(text, Path::new("x.toml")).unwrap();
        assert_eq!(pack.name, "t");
        assert_eq!(pack.rules.len(), 1);
        let m = &pack.rules[0].matcher;
        assert_eq!(m.keywords, vec!["tok_"]);
        assert!(m.allow_regexes.is_empty(), "the AND allowlist needs a path: dropped");
        assert_eq!(m.allow_match_regexes, vec!["^tok_bbbb"]);
        assert!(m.stopwords.is_empty(), "targeted at another rule");
        let e = engine(pack);
        assert_eq!(ids(&e, "x tok_aaaaaaaa y"), vec!["tok"]);
        assert!(ids(&e, "x tok_bbbbcccc y").is_empty());
    }

    /// `condition = "AND"`: the allowlist applies only when a regex matches and a stopword
    /// is in the secret; the default (OR) and an AND with one part need either one.
    #[test]
    fn and_allowlists_need_every_part_or_allowlists_any() {
        let config = |condition: &str, target: &str| {
            format!(
                r#"
[[rules]]
id = "tok"
regex = '''(tok_[a-z0-9]{{12}})'''
keywords = ["tok_"]
[[rules.allowlists]]
{condition}
{target}
regexes = ['''^tok_test''']
stopwords = ["dummy"]
[[allowlists]]
condition = "AND"
stopwords = ["fake"]
"#
            )
        };
        let texts = ["x tok_testdummy001 y", "x tok_test8q2z7wx4 y", "x tok_9dummy9q2z7x y", "x tok_8q2z7wx4k1m3 y"];

        let and = parse(&config(r#"condition = "AND""#, ""), Path::new("and.toml")).unwrap();
        let m = &and.rules[0].matcher;
        assert_eq!(m.allow_all.len(), 1);
        assert!(m.allow_regexes.is_empty());
        assert_eq!(m.stopwords, vec!["fake"], "an AND allowlist with one part is an OR one");
        let e = engine(and);
        let found: Vec<bool> = texts.iter().map(|t| !ids(&e, t).is_empty()).collect();
        assert_eq!(found, [false, true, true, true], "AND: allowed only with both the regex and the stopword");
        assert!(ids(&e, "x tok_fake8q2z7wx4 y").is_empty());

        let or = engine(parse(&config("", ""), Path::new("or.toml")).unwrap());
        let found: Vec<bool> = texts.iter().map(|t| !ids(&or, t).is_empty()).collect();
        assert_eq!(found, [false, false, false, true], "OR (default): either one allows");

        let lower =
            engine(parse(&config(r#"condition = "and""#, r#"regexTarget = "match""#), Path::new("m.toml")).unwrap());
        let found: Vec<bool> = texts.iter().map(|t| !ids(&lower, t).is_empty()).collect();
        assert_eq!(found, [false, true, true, true], "AND on the whole match, condition in any case");
    }

    #[test]
    fn global_allowlists_count_once_per_rule_against_the_pack_limits() {
        // 60 global regexes copied into each of 140 rules: 8,540 regexes, over 8,192. The
        // pack is refused at the rule that crosses the limit, before compiling it.
        let regexes: Vec<String> = (0..60).map(|i| format!("'''^allowed{i}$'''")).collect();
        let mut text = format!("[allowlist]\nregexes = [{}]\n", regexes.join(", "));
        for r in 0..140 {
            text += &format!("[[rules]]\nid = \"r{r}\"\nregex = '''tok{r}_[a-z]{{8}}'''\n");
        }
        let e = parse(&text, Path::new("gl.toml")).unwrap_err();
        assert_eq!(e.rule.as_deref(), Some("r134"), "{e}");
        assert!(
            e.message.starts_with("more than 8192 regexes (allowlists included, gitleaks global ones once per rule)"),
            "{e}"
        );
        // Per rule: its own allowlist regexes and the global ones together.
        let text = format!(
            "[allowlist]\nregexes = [{}]\n[[rules]]\nid = \"a\"\nregex = 'x'\n[rules.allowlist]\nregexes = ['y', 'z', 'w', 'v']\n",
            regexes.join(", ")
        );
        let e = parse(&text, Path::new("gl.toml")).unwrap_err();
        assert!(e.message.starts_with("65 regexes (regex and allowlists), over the limit of 64 per rule"), "{e}");
    }

    #[test]
    fn go_regexes_are_translated() {
        assert_eq!(go_regex_to_rust(r"\w+"), "[0-9A-Za-z_]+");
        assert_eq!(go_regex_to_rust(r"[\w.-]{3}"), "[0-9A-Za-z_.-]{3}");
        assert_eq!(go_regex_to_rust(r"[^\s'\x22]"), r"[^\t\n\f\r '\x22]");
        assert_eq!(go_regex_to_rust(r"\bab\B"), r"(?-u:\b)ab(?-u:\B)");
        assert_eq!(go_regex_to_rust(r"[\S\D]"), "[[:^space:][:^digit:]]");
        assert_eq!(go_regex_to_rust(r"[]\w]"), "[]0-9A-Za-z_]");
        assert_eq!(go_regex_to_rust(r"[[:alpha:]\d]x\d"), "[[:alpha:]0-9]x[0-9]");
        assert_eq!(go_regex_to_rust(r"\Qa.b\E+c"), r"a\.b+c");
        assert_eq!(go_regex_to_rust(r"[[a]"), r"[\[a]");
        assert_eq!(go_regex_to_rust(r"\x60\\w\."), r"\x60\\w\.");
        // The gitleaks generic rule compiles within the size limit once ASCII.
        let generic = r#"(?i)[\w.-]{0,50}?(?:access|auth|(?-i:[Aa]pi|API)|credential|creds|key|passw(?:or)?d|secret|token)(?:[ \t\w.-]{0,20})[\s'"]{0,3}(?:=|>|:{1,3}=|\|\||:|=>|\?=|,)[\x60'"\s=]{0,5}([\w.=-]{10,150}|[a-z0-9][a-z0-9+/]{11,}={0,3})(?:[\x60'"\s;]|\\[nr]|$)"#;
        assert!(crate::rules::pack::compile_regex(generic).is_err(), "Unicode \\w is too big");
        crate::rules::pack::compile_regex(&go_regex_to_rust(generic)).unwrap();
    }
}
