//! Provider and model allowlists per tenant: a call to a provider or model its tenant is
//! not approved for is a finding (policy drift after a fast release, a new SDK default,
//! a shadow integration).

use crate::rules::pack::ProviderPolicy;

/// The policies `call` violates: those whose tenant covers `cgroup` and whose allowlist
/// does not contain the call's provider, or (when models are listed) its model.
pub fn violations<'a>(
    policies: impl IntoIterator<Item = &'a ProviderPolicy>,
    cgroup: &str,
    provider: &str,
    model: Option<&str>,
) -> Vec<&'a ProviderPolicy> {
    policies
        .into_iter()
        .filter(|p| covers(&p.tenant, cgroup))
        .filter(|p| {
            let provider_ok = p.allow_providers.iter().any(|a| a == provider);
            let model_ok =
                p.allow_models.is_empty() || model.is_some_and(|m| p.allow_models.iter().any(|g| glob(g, m)));
            !(provider_ok && model_ok)
        })
        .collect()
}

/// "*" covers everything; otherwise a cgroup path prefix on a path-component boundary
/// ("/system.slice/app" covers "/system.slice/app/worker", not "/system.slice/apple").
fn covers(tenant: &str, cgroup: &str) -> bool {
    tenant == "*" || crate::cgroup::covers(tenant, cgroup)
}

/// `*` matches any run of characters; everything else literally (ASCII case-insensitive,
/// as model names are).
fn glob(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && p[pi] != b'*' && p[pi].eq_ignore_ascii_case(&t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            pi += 1;
            mark = ti;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::pack::{Action, Severity};

    fn policy(tenant: &str, providers: &[&str], models: &[&str]) -> ProviderPolicy {
        ProviderPolicy {
            id: "p".into(),
            tenant: tenant.into(),
            allow_providers: providers.iter().map(|s| s.to_string()).collect(),
            allow_models: models.iter().map(|s| s.to_string()).collect(),
            action: Action::Warn,
            severity: Severity::Sev2,
            rationale: "r".into(),
            line: 1,
        }
    }

    #[test]
    fn globs() {
        assert!(glob("gpt-4o*", "gpt-4o-mini"));
        assert!(glob("gpt-4o*", "GPT-4O"));
        assert!(glob("*sonnet*", "claude-3-5-sonnet-latest"));
        assert!(!glob("gpt-4o*", "gpt-4.1"));
        assert!(glob("a*b*c", "axxbyyc") && !glob("a*b*c", "axxbyy"));
    }

    #[test]
    fn tenants_and_allowlists() {
        let ps = [
            policy("/system.slice/chat.service", &["openai"], &["gpt-4o*"]),
            policy("*", &["openai", "anthropic"], &[]),
        ];
        let v = |cg, prov, model| violations(&ps, cg, prov, model).len();
        assert_eq!(v("/system.slice/chat.service", "openai", Some("gpt-4o-mini")), 0);
        assert_eq!(v("/system.slice/chat.service/sub", "openai", Some("gpt-4.1")), 1);
        assert_eq!(v("/system.slice/chat.service", "anthropic", Some("claude")), 1);
        assert_eq!(v("/system.slice/chat.servicex", "anthropic", Some("claude")), 0);
        assert_eq!(v("/user.slice", "openrouter", Some("x")), 1);
        assert_eq!(v("/system.slice/chat.service", "openai", None), 1, "an unknown model is not an approved one");
    }
}
