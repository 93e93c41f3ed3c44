//! `authorization` in xDS: Envoy's RBAC HTTP filter in the connection manager, with the
//! principals of each virtual host or route in its `typed_per_filter_config`, both ways.
//!
//! remora's `authorization.principals` becomes an ALLOW rule with one policy `remora` whose
//! permission is `any` and whose principals are `authenticated.principal_name` matchers:
//! `exact` for a name, `prefix` for a name ending in `*`, and the regex `.+` for `*` alone
//! (any peer with a named certificate: Envoy's matcher without a name would also admit a TLS
//! client that sent no certificate).
//!
//! One difference stays: Envoy matches a principal against every URI SAN, then every DNS
//! SAN, of the client certificate; remora against its first URI SAN, else its first DNS SAN.
//! A certificate with several SANs can therefore be admitted by Envoy and not by remora
//! (never the other way round).
//! The filter goes into the connection manager of every listener whose route config
//! authorizes anything (without it Envoy would ignore the per-route rules and admit all);
//! configured there without rules, it lets everything through, and the per-route rules decide.
//! Anything else RBAC can express (deny rules, headers, IPs, conditions) is refused by name.

use prost::Name;
use remora_xds::envoy_types::pb::envoy::config::rbac::v3 as erbac;
use remora_xds::envoy_types::pb::envoy::extensions::filters::http::rbac::v3 as frbac;
use remora_xds::envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use remora_xds::envoy_types::pb::envoy::r#type::matcher::v3 as matcher;
use remora_xds::envoy_types::pb::google::protobuf as pbuf;

use super::{any, decode_any, type_name, At, Errs};
use crate::config::raw::{RawAuthorization, RawRouteConfig};

use erbac::principal::{Authenticated, Identifier};
use matcher::string_matcher::MatchPattern;

/// The filter's name, and the key of its per-route config.
pub(super) const RBAC_FILTER: &str = "envoy.filters.http.rbac";
const POLICY: &str = "remora";
/// The principal name pattern of remora's `*`: any non-empty name.
const ANY_NAME: &str = ".+";

// === remora → Envoy ===

/// True when any virtual host or route of `rc` sets `authorization`.
pub(super) fn authorizes(rc: &RawRouteConfig) -> bool {
    rc.virtual_hosts
        .iter()
        .any(|v| v.authorization.is_some() || v.routes.iter().any(|r| r.authorization.is_some()))
}

/// The connection manager's RBAC filter: no rules of its own.
pub(super) fn filter() -> hcm::HttpFilter {
    hcm::HttpFilter {
        name: RBAC_FILTER.into(),
        config_type: Some(hcm::http_filter::ConfigType::TypedConfig(any(
            &frbac::Rbac::default(),
        ))),
        ..Default::default()
    }
}

/// The `typed_per_filter_config` entry of a virtual host or route.
pub(super) fn per_route_to(a: &RawAuthorization) -> (String, pbuf::Any) {
    let principals: Vec<erbac::Principal> = a
        .principals
        .iter()
        .map(|p| {
            let name = match p.strip_suffix('*') {
                Some("") => MatchPattern::SafeRegex(matcher::RegexMatcher {
                    regex: ANY_NAME.into(),
                    ..Default::default()
                }),
                Some(prefix) => MatchPattern::Prefix(prefix.to_string()),
                None => MatchPattern::Exact(p.clone()),
            };
            erbac::Principal {
                identifier: Some(Identifier::Authenticated(Authenticated {
                    principal_name: Some(matcher::StringMatcher {
                        match_pattern: Some(name),
                        ignore_case: false,
                    }),
                })),
            }
        })
        .collect();
    // Envoy requires at least one principal per policy: an empty list is no policy at all,
    // which an ALLOW rule reads as "admit nobody", as remora does.
    let policies = if principals.is_empty() {
        Default::default()
    } else {
        [(
            POLICY.to_string(),
            erbac::Policy {
                permissions: vec![erbac::Permission {
                    rule: Some(erbac::permission::Rule::Any(true)),
                }],
                principals,
                ..Default::default()
            },
        )]
        .into()
    };
    let per_route = frbac::RbacPerRoute {
        rbac: Some(frbac::Rbac {
            rules: Some(erbac::Rbac {
                action: erbac::rbac::Action::Allow as i32,
                policies,
                ..Default::default()
            }),
            ..Default::default()
        }),
    };
    (RBAC_FILTER.to_string(), any(&per_route))
}

// === Envoy → remora ===

/// The connection manager's RBAC filter: accepted only under its usual name (the key its
/// per-route configs are found by), with a typed config and no rules of its own.
pub(super) fn filter_from(name: &str, config: Option<&pbuf::Any>, at: &At<'_>, e: &mut Errs) {
    if name != RBAC_FILTER {
        e.add(
            &at.field("name"),
            format!("the RBAC filter must be named `{RBAC_FILTER}` (its per-route configs are keyed by that name)"),
        );
    }
    let Some(config) = config else {
        e.add(
            &at.field("typed_config"),
            "is required (config_discovery is not supported)",
        );
        return;
    };
    match decode_any::<frbac::Rbac>(config) {
        Ok(r) => {
            let per_route = "not supported on the connection manager: set the rules per virtual host or route (typed_per_filter_config)";
            let checks = [
                ("rules", r.rules.is_some(), per_route),
                ("matcher", r.matcher.is_some(), per_route),
                ("shadow_rules", r.shadow_rules.is_some(), "not supported"),
                (
                    "shadow_matcher",
                    r.shadow_matcher.is_some(),
                    "not supported",
                ),
            ];
            for (field, set, msg) in checks {
                if set {
                    e.add(&at.field("typed_config").field(field), msg);
                }
            }
        }
        Err(msg) => e.add(&at.field("typed_config"), msg),
    }
}

/// Refuses RBAC per-route configs where remora does not read them: under another key, or at
/// a level remora has no `authorization` for (`level`: the route config, a weighted
/// cluster), where Envoy would enforce them.
pub(super) fn refuse_elsewhere(
    configs: &std::collections::HashMap<String, pbuf::Any>,
    read_here: bool,
    at: &At<'_>,
    e: &mut Errs,
) {
    let mut keys: Vec<&String> = configs.keys().collect();
    keys.sort();
    for key in keys {
        let holds_rbac =
            type_name(&configs[key]) == frbac::RbacPerRoute::full_name() || key == RBAC_FILTER;
        if !holds_rbac || (read_here && key == RBAC_FILTER) {
            continue;
        }
        let msg = if read_here {
            format!("RBAC is read under `{RBAC_FILTER}` only")
        } else {
            "RBAC is supported on virtual hosts and routes only".to_string()
        };
        e.add(&at.field(&format!("typed_per_filter_config[{key}]")), msg);
    }
}

/// True when the filter is RBAC (by its config's type, or, without one, by its name).
pub(super) fn is_rbac(name: &str, config: Option<&pbuf::Any>) -> bool {
    config.map_or(name == RBAC_FILTER, |a| {
        type_name(a) == frbac::Rbac::full_name()
    })
}

/// A virtual host's or route's `authorization`, from its `typed_per_filter_config`.
pub(super) fn per_route_from(
    configs: &std::collections::HashMap<String, pbuf::Any>,
    at: &At<'_>,
    e: &mut Errs,
) -> Option<RawAuthorization> {
    refuse_elsewhere(configs, true, at, e);
    let config = configs.get(RBAC_FILTER)?;
    let at = at.field(&format!("typed_per_filter_config[{RBAC_FILTER}]"));
    let per_route = match decode_any::<frbac::RbacPerRoute>(config) {
        Ok(p) => p,
        Err(msg) => {
            e.add(&at, msg);
            return None;
        }
    };
    let Some(rules) = per_route.rbac.and_then(|r| {
        if r.matcher.is_some() || r.shadow_rules.is_some() || r.shadow_matcher.is_some() {
            e.add(&at.field("rbac"), "only `rules` is supported");
        }
        r.rules
    }) else {
        e.add(
            &at.field("rbac.rules"),
            "is required (remora cannot turn authorization off for one route: admit `*` instead)",
        );
        return None;
    };
    let at = at.field("rbac.rules");
    if rules.action != erbac::rbac::Action::Allow as i32 {
        e.add(&at.field("action"), "only ALLOW is supported");
    }
    if rules.audit_logging_options.is_some() {
        e.add(&at.field("audit_logging_options"), "not supported");
    }
    let mut names: Vec<&String> = rules.policies.keys().collect();
    names.sort();
    let mut principals = Vec::new();
    for name in names {
        let policy = &rules.policies[name];
        let p_at = at.field(&format!("policies[{name}]"));
        let any_permission = matches!(
            policy.permissions.as_slice(),
            [erbac::Permission {
                rule: Some(erbac::permission::Rule::Any(true))
            }]
        );
        if !any_permission {
            e.add(
                &p_at.field("permissions"),
                "only a single `any: true` is supported (remora authorizes by peer identity)",
            );
        }
        if policy.condition.is_some() || policy.checked_condition.is_some() {
            e.add(&p_at.field("condition"), "not supported");
        }
        for (i, principal) in policy.principals.iter().enumerate() {
            match principal_from(principal) {
                Some(p) => principals.push(p),
                None => e.add(
                    &p_at.item("principals", i),
                    "only `authenticated` with an exact or prefix principal_name is supported",
                ),
            }
        }
    }
    Some(RawAuthorization { principals })
}

/// remora's form of one principal: a name, `prefix*`, or `*`.
fn principal_from(p: &erbac::Principal) -> Option<String> {
    let Some(Identifier::Authenticated(a)) = &p.identifier else {
        return None;
    };
    // Envoy's matcher without a name admits more (a TLS client without a certificate):
    // remora's `*` is the closest, and stricter.
    let Some(m) = &a.principal_name else {
        return Some("*".to_string());
    };
    if m.ignore_case {
        return None;
    }
    match &m.match_pattern {
        Some(MatchPattern::Exact(name)) if !name.ends_with('*') => Some(name.clone()),
        Some(MatchPattern::Prefix(prefix)) if !prefix.is_empty() => Some(format!("{prefix}*")),
        Some(MatchPattern::SafeRegex(re)) if re.regex == ANY_NAME => Some("*".to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::super::{from_envoy, to_envoy};
    use super::*;
    use crate::config::raw::RawConfig;

    const CONFIG: &str = r#"
listeners:
  - { name: guarded, address: 127.0.0.1:1, route_config: guarded }
  - { name: open, address: 127.0.0.1:2, route_config: open }
route_configs:
  - name: guarded
    virtual_hosts:
      - name: v
        domains: ["*"]
        authorization: { principals: ["spiffe://mesh.local/ns/shop/sa/*", "spiffe://mesh.local/ns/ops/sa/admin"] }
        routes:
          - { match: { prefix: /anyone }, cluster: c, authorization: { principals: ["*"] } }
          - { match: { prefix: /nobody }, cluster: c, authorization: { principals: [] } }
          - { match: { prefix: / }, cluster: c }
  - name: open
    virtual_hosts: [{ name: v, domains: ["*"], routes: [{ match: { prefix: / }, cluster: c }] }]
clusters: [{ name: c, endpoints: [{ address: 127.0.0.1:3 }] }]
"#;

    fn raw() -> RawConfig {
        crate::config::parse(CONFIG, "t.yaml").unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn authorization_survives_the_round_trip() {
        let raw = raw();
        let back = from_envoy(&to_envoy(&raw)).unwrap_or_else(|e| panic!("{e:#?}"));
        assert_eq!(back.route_configs, raw.route_configs);
        assert_eq!(back.listeners, raw.listeners);
    }

    /// Only a listener whose routes authorize gets the RBAC filter, before the router.
    #[test]
    fn the_rbac_filter_guards_listeners_that_authorize() {
        let res = to_envoy(&raw());
        let filters = |i: usize| -> Vec<String> {
            let lis::filter::ConfigType::TypedConfig(a) = res.listeners[i].filter_chains[0].filters
                [0]
            .config_type
            .clone()
            .unwrap() else {
                panic!()
            };
            let m: hcm::HttpConnectionManager = decode_any(&a).unwrap();
            m.http_filters.into_iter().map(|f| f.name).collect()
        };
        assert_eq!(filters(0), [RBAC_FILTER, "envoy.filters.http.router"]);
        assert_eq!(filters(1), ["envoy.filters.http.router"]);
    }

    use remora_xds::envoy_types::pb::envoy::config::listener::v3 as lis;

    fn errors_with(change: impl FnOnce(&mut erbac::Rbac)) -> Vec<String> {
        let mut res = to_envoy(&raw());
        let vhost = &mut res.route_configs[0].virtual_hosts[0];
        let any = vhost.typed_per_filter_config.get_mut(RBAC_FILTER).unwrap();
        let mut per_route: frbac::RbacPerRoute = decode_any(any).unwrap();
        change(per_route.rbac.as_mut().unwrap().rules.as_mut().unwrap());
        *any = super::super::any(&per_route);
        from_envoy(&res).expect_err("refused")
    }

    /// RBAC that Envoy would enforce where remora does not look is refused: a filter under
    /// another name (its per-route configs are keyed by it), one from config discovery, and
    /// per-route configs under another key, on the route config or on a weighted cluster.
    #[test]
    fn rbac_remora_would_not_read_is_refused() {
        let manager_of = |res: &remora_xds::Resources| -> hcm::HttpConnectionManager {
            let Some(lis::filter::ConfigType::TypedConfig(a)) =
                &res.listeners[0].filter_chains[0].filters[0].config_type
            else {
                panic!()
            };
            decode_any(a).unwrap()
        };
        let set_manager = |res: &mut remora_xds::Resources, m: &hcm::HttpConnectionManager| {
            res.listeners[0].filter_chains[0].filters[0].config_type =
                Some(lis::filter::ConfigType::TypedConfig(super::super::any(m)));
        };
        let refused = |res: &remora_xds::Resources, want: &str| {
            let errs = from_envoy(res).expect_err("refused");
            assert!(
                errs.iter().any(|e| e.contains(want)),
                "no `{want}` in {errs:#?}"
            );
        };

        let mut res = to_envoy(&raw());
        let mut m = manager_of(&res);
        m.http_filters[0].name = "rbac".into();
        set_manager(&mut res, &m);
        refused(
            &res,
            "http_filters[0] (rbac).name: the RBAC filter must be named",
        );

        let mut res = to_envoy(&raw());
        let mut m = manager_of(&res);
        m.http_filters[0].config_type = Some(hcm::http_filter::ConfigType::ConfigDiscovery(
            Default::default(),
        ));
        set_manager(&mut res, &m);
        refused(
            &res,
            "typed_config: is required (config_discovery is not supported)",
        );

        let mut res = to_envoy(&raw());
        let vhost = &mut res.route_configs[0].virtual_hosts[0];
        let rule = vhost.typed_per_filter_config.remove(RBAC_FILTER).unwrap();
        vhost
            .typed_per_filter_config
            .insert("rbac".into(), rule.clone());
        res.route_configs[1]
            .typed_per_filter_config
            .insert(RBAC_FILTER.into(), rule);
        let errs = from_envoy(&res).expect_err("refused");
        for want in [
            "route config `guarded`: virtual_hosts[0].typed_per_filter_config[rbac]: RBAC is read under `envoy.filters.http.rbac` only",
            "route config `open`: typed_per_filter_config[envoy.filters.http.rbac]: RBAC is supported on virtual hosts and routes only",
        ] {
            assert!(errs.iter().any(|e| e == want), "no `{want}` in {errs:#?}");
        }
    }

    /// What RBAC can say and remora cannot is refused by field.
    #[test]
    fn other_rbac_rules_are_refused_by_name() {
        let errs = errors_with(|r| r.action = erbac::rbac::Action::Deny as i32);
        assert_eq!(
            errs,
            ["route config `guarded`: virtual_hosts[0].typed_per_filter_config[envoy.filters.http.rbac].rbac.rules.action: only ALLOW is supported"]
        );
        let errs = errors_with(|r| {
            let policy = r.policies.get_mut(POLICY).unwrap();
            policy.principals.push(erbac::Principal {
                identifier: Some(Identifier::Any(true)),
            });
            policy.permissions[0].rule = Some(erbac::permission::Rule::DestinationPort(443));
        });
        assert_eq!(
            errs,
            [
                "route config `guarded`: virtual_hosts[0].typed_per_filter_config[envoy.filters.http.rbac].rbac.rules.policies[remora].permissions: only a single `any: true` is supported (remora authorizes by peer identity)",
                "route config `guarded`: virtual_hosts[0].typed_per_filter_config[envoy.filters.http.rbac].rbac.rules.policies[remora].principals[2]: only `authenticated` with an exact or prefix principal_name is supported",
            ]
        );
    }
}
