//! The rule set: validated, immutable, compiled into lookup maps. YAML files
//! and PostgreSQL both produce a [`RuleSet`]; a request is matched against it
//! without allocating.
//!
//! From PostgreSQL it also carries the API keys (by hash) and the rules that
//! replace a domain's rules for one plan's or one tenant's keys, so that
//! rules and keys are swapped together and a request never waits for I/O.

use std::collections::HashMap as StdHashMap;

/// The compiled rules' maps: foldhash, not SipHash. They are built from
/// the rules and only looked up with what clients send, never filled with
/// it, so a client cannot aim keys at one bucket (what SipHash guards
/// against), and foldhash hashes a short descriptor value in a fraction of
/// SipHash's instructions (two lookups per decision: some 400 of them).
type HashMap<K, V> = StdHashMap<K, V, foldhash::fast::RandomState>;
use std::sync::Arc;

use super::wildcard::{Pattern, PatternSet};
use super::{bounds, Entry, Limit, Metadata};

/// One configured limit, at the end of a descriptor path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// The path in the configuration, envoyproxy/ratelimit style:
    /// `domain.key_value.key`. Built from configuration only, never from
    /// request values, so it is safe as a metric label.
    pub path: Arc<str>,
    pub limit: RuleLimit,
    pub name: Option<Arc<str>>,
    pub replaces: Vec<Arc<str>>,
    pub shadow_mode: bool,
    pub quota_mode: bool,
    /// Returned in Envoy's dynamic metadata when this rule admits a hit.
    pub metadata: Metadata,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RuleLimit {
    Unlimited,
    /// Every one of these must admit a hit: one from `rate_limit`, or
    /// several from sluice's `rate_limits` (a burst and a daily limit).
    Limited(Vec<Limit>),
}

/// A node of the descriptor tree.
#[derive(Clone, Debug, Default)]
pub struct Node {
    pub rule: Option<Arc<Rule>>,
    pub children: Level,
    /// Set on a wildcard node with `share_threshold`: every matching value
    /// shares one counter, keyed by this pattern.
    pub shared_pattern: Option<Arc<str>>,
}

/// The entries allowed at one depth, grouped by key.
#[derive(Clone, Debug, Default)]
pub struct Level {
    keys: HashMap<Box<str>, KeyNodes>,
}

#[derive(Clone, Debug, Default)]
struct KeyNodes {
    exact: HashMap<Box<str>, Node>,
    /// Values with a `*`, in file order; the first match wins.
    wildcards: PatternSet<Node>,
    any: Option<Node>,
}

/// Which entry of a level matched a descriptor entry's value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Matched<'r> {
    /// `value: v`, the value itself.
    Exact,
    /// A `value:` with `*`: the pattern as written.
    Wildcard(&'r str),
    /// The key alone, no `value:`.
    KeyOnly,
}

/// How a configured entry matches a value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ValueMatch {
    Exact(String),
    /// A value with `*` anywhere in it, any number of times.
    Wildcard(Pattern),
    Any,
}

impl ValueMatch {
    pub fn parse(value: Option<&str>) -> ValueMatch {
        match value {
            None | Some("") => ValueMatch::Any,
            Some(v) => match Pattern::new(v) {
                Some(pattern) => ValueMatch::Wildcard(pattern),
                None => ValueMatch::Exact(v.to_owned()),
            },
        }
    }
}

impl Level {
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Adds a node; returns it back if (key, value) already exists here.
    pub fn insert(&mut self, key: &str, value: ValueMatch, node: Node) -> Result<(), Node> {
        let slot = self.keys.entry(key.into()).or_default();
        match value {
            ValueMatch::Exact(v) => {
                if slot.exact.contains_key(v.as_str()) {
                    return Err(node);
                }
                slot.exact.insert(v.into(), node);
            }
            ValueMatch::Wildcard(p) => slot.wildcards.insert(p, node)?,
            ValueMatch::Any => {
                if slot.any.is_some() {
                    return Err(node);
                }
                slot.any = Some(node);
            }
        }
        Ok(())
    }

    /// The matcher: the entry that matches `entry`, and how.
    fn find(&self, entry: &Entry<'_>) -> Option<(Matched<'_>, &Node)> {
        self.candidates(entry).next()
    }

    /// Every entry that matches `entry`, in envoyproxy/ratelimit's order of
    /// precedence: the exact value (one hash lookup, however many exact
    /// values there are), then the wildcards that match in file order, then
    /// the key-only entry. The first is the match ([`find`]); explaining a
    /// lookup lists the others as passed over. Lazy: `find` looks no further
    /// than the match, and finds the first wildcard through the
    /// [`PatternSet`]'s own lookup; only explaining goes on to try the other
    /// patterns in turn.
    ///
    /// [`find`]: Level::find
    pub(super) fn candidates<'l, 'v>(
        &'l self,
        entry: &Entry<'v>,
    ) -> impl Iterator<Item = (Matched<'l>, &'l Node)> + use<'l, 'v> {
        let slot = self.keys.get(entry.key);
        let value = entry.value;
        let exact = slot.and_then(|s| s.exact.get(value));
        let wildcard =
            |(pattern, n): (&'l Pattern, &'l Node)| (Matched::Wildcard(pattern.as_str()), n);
        // The set's first match is the first in file order that matches, so
        // the patterns after it are the matching ones but that first.
        let first = std::iter::once_with(move || slot.and_then(|s| s.wildcards.find(value)))
            .flatten()
            .map(wildcard);
        let others = slot
            .into_iter()
            .flat_map(|s| s.wildcards.iter())
            .filter(move |(pattern, _)| pattern.matches(value))
            .skip(1)
            .map(wildcard);
        exact
            .map(|n| (Matched::Exact, n))
            .into_iter()
            .chain(first)
            .chain(others)
            .chain(
                slot.and_then(|s| s.any.as_ref())
                    .map(|n| (Matched::KeyOnly, n)),
            )
    }

    fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.keys.values().flat_map(|k| {
            k.exact
                .values()
                .chain(k.wildcards.iter().map(|(_, n)| n))
                .chain(k.any.iter())
        })
    }
}

/// A rule found for a descriptor, with the entries whose values are replaced
/// by a shared wildcard pattern in the counter key.
#[derive(Debug)]
pub struct Match<'r> {
    pub rule: &'r Rule,
    pub shared: [Option<&'r str>; bounds::MAX_ENTRIES],
}

/// A live API key as the in-memory snapshot holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiKey {
    /// The tenant's id (a UUID), for usage records.
    pub tenant_id: Arc<str>,
    /// The tenant's name: it selects tenant-scoped rules.
    pub tenant: Arc<str>,
    /// The plan whose rules apply: the key's own, else its tenant's.
    pub plan: Arc<str>,
    /// The tenant's monthly request quota, from the tenant's plan, when
    /// enforced (a plan that bills overage does not deny past it).
    pub monthly_quota: Option<u32>,
    /// The zone of the tenant's billing cycles (calendar months).
    pub time_zone: chrono_tz::Tz,
}

/// All domains' rules. Immutable once built; swapped whole on reload.
#[derive(Clone, Debug, Default)]
pub struct RuleSet {
    domains: HashMap<Box<str>, Level>,
    /// plan -> domain -> tree, replacing the domain's tree for that plan's keys.
    plans: HashMap<Box<str>, HashMap<Box<str>, Level>>,
    /// tenant -> domain -> tree, replacing both for that tenant's keys.
    tenants: HashMap<Box<str>, HashMap<Box<str>, Level>>,
    /// API keys by their keyed hash (hex).
    api_keys: HashMap<Box<str>, ApiKey>,
}

/// Whose rules a scoped tree replaces the domain's rules for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope<'a> {
    Plan(&'a str),
    Tenant(&'a str),
}

impl RuleSet {
    pub fn new() -> RuleSet {
        RuleSet::default()
    }

    /// Adds a domain's tree; `false` if the domain already exists.
    pub fn insert_domain(&mut self, domain: &str, root: Level) -> bool {
        if self.domains.contains_key(domain) {
            return false;
        }
        self.domains.insert(domain.into(), root);
        true
    }

    /// Adds a plan's or a tenant's tree for a domain; `false` if it exists.
    /// The domain itself must have a tree too (it may be empty), or requests
    /// for it count as an unknown domain.
    pub fn insert_scoped(&mut self, scope: Scope<'_>, domain: &str, root: Level) -> bool {
        let trees = match scope {
            Scope::Plan(p) => self.plans.entry(p.into()).or_default(),
            Scope::Tenant(t) => self.tenants.entry(t.into()).or_default(),
        };
        if trees.contains_key(domain) {
            return false;
        }
        trees.insert(domain.into(), root);
        true
    }

    /// Adds an API key by its hash; `false` if the hash exists.
    pub fn insert_api_key(&mut self, hash: &str, key: ApiKey) -> bool {
        if self.api_keys.contains_key(hash) {
            return false;
        }
        self.api_keys.insert(hash.into(), key);
        true
    }

    /// The live key with this hash.
    pub fn api_key(&self, hash: &str) -> Option<&ApiKey> {
        self.api_keys.get(hash)
    }

    pub fn api_key_count(&self) -> usize {
        self.api_keys.len()
    }

    /// Every live key, in no particular order.
    pub fn api_keys(&self) -> impl Iterator<Item = &ApiKey> {
        self.api_keys.values()
    }

    pub fn has_domain(&self, domain: &str) -> bool {
        self.domains.contains_key(domain)
    }

    pub fn domains(&self) -> impl Iterator<Item = &str> {
        self.domains.keys().map(|d| &**d)
    }

    /// Every rule, scoped ones included, for listing and metrics.
    pub fn rules(&self) -> Vec<Arc<Rule>> {
        let mut out = Vec::new();
        let scoped = self.plans.values().chain(self.tenants.values());
        let mut stack: Vec<&Level> = self
            .domains
            .values()
            .chain(scoped.flat_map(|trees| trees.values()))
            .collect();
        while let Some(level) = stack.pop() {
            for node in level.nodes() {
                if let Some(rule) = &node.rule {
                    out.push(rule.clone());
                }
                stack.push(&node.children);
            }
        }
        out.sort_by(|a, b| a.path.cmp(&b.path));
        out
    }

    /// Finds the rule for a descriptor. A limit applies only when the
    /// descriptor ends exactly at the node that carries it; a matched node
    /// without a rule (a whitelisted value) yields no limit.
    pub fn lookup<'r>(&'r self, domain: &str, entries: &[Entry<'_>]) -> Option<Match<'r>> {
        walk(self.domains.get(domain)?, entries, |_| {})
    }

    /// As [`RuleSet::lookup`], for a request made with an API key: the key's
    /// tenant's tree for the domain if there is one, else its plan's, else
    /// the domain's.
    pub fn lookup_for_key<'r>(
        &'r self,
        domain: &str,
        key: &ApiKey,
        entries: &[Entry<'_>],
    ) -> Option<Match<'r>> {
        walk(self.tree(domain, Some(key))?.1, entries, |_| {})
    }

    /// The tree a descriptor is matched against, and whose it is (`None`:
    /// the domain's own): for a key, its tenant's, else its plan's, else the
    /// domain's.
    pub(super) fn tree<'r>(
        &'r self,
        domain: &str,
        key: Option<&ApiKey>,
    ) -> Option<(Option<Scope<'r>>, &'r Level)> {
        let scoped = |trees: &'r HashMap<Box<str>, HashMap<Box<str>, Level>>, name: &str| {
            let (name, trees) = trees.get_key_value(name)?;
            Some((&**name, trees.get(domain)?))
        };
        let key_tree = key.and_then(|key| {
            scoped(&self.tenants, &key.tenant)
                .map(|(t, tree)| (Some(Scope::Tenant(t)), tree))
                .or_else(|| {
                    scoped(&self.plans, &key.plan).map(|(p, tree)| (Some(Scope::Plan(p)), tree))
                })
        });
        key_tree.or_else(|| Some((None, self.domains.get(domain)?)))
    }
}

/// One step of a walk down a tree: the descriptor entry at `depth`, the
/// level it is matched in, and what the matcher found there.
#[derive(Clone, Copy, Debug)]
pub(super) struct Visit<'r> {
    pub depth: usize,
    pub level: &'r Level,
    pub found: Option<(Matched<'r>, &'r Node)>,
}

/// The lookup: matches the entries level by level, showing each step to
/// `visit` (explaining records them; a lookup ignores them).
pub(super) fn walk<'r>(
    root: &'r Level,
    entries: &[Entry<'_>],
    mut visit: impl FnMut(Visit<'r>),
) -> Option<Match<'r>> {
    let mut level = root;
    let mut shared = [None; bounds::MAX_ENTRIES];
    let mut found = None;
    for (i, entry) in entries.iter().enumerate() {
        let step = level.find(entry);
        visit(Visit {
            depth: i,
            level,
            found: step,
        });
        let (_, node) = step?;
        if let (Some(pattern), Some(slot)) = (&node.shared_pattern, shared.get_mut(i)) {
            *slot = Some(&**pattern);
        }
        if i + 1 == entries.len() {
            found = node.rule.as_deref();
        }
        level = &node.children;
    }
    found.map(|rule| Match { rule, shared })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::{Unit, Window};

    fn limited(path: &str, n: u32) -> Node {
        Node {
            rule: Some(Arc::new(Rule {
                path: path.into(),
                limit: RuleLimit::Limited(vec![Limit {
                    requests_per_unit: n,
                    window: Window::of(Unit::Minute),
                    algorithm: None,
                    burst: None,
                    name: None,
                }]),
                name: None,
                replaces: vec![],
                shadow_mode: false,
                quota_mode: false,
                metadata: Metadata::default(),
            })),
            ..Node::default()
        }
    }

    fn e<'a>(key: &'a str, value: &'a str) -> Entry<'a> {
        Entry { key, value }
    }

    fn path_of(rs: &RuleSet, entries: &[Entry<'_>]) -> Option<String> {
        rs.lookup("d", entries).map(|m| m.rule.path.to_string())
    }

    #[test]
    fn exact_then_first_wildcard_then_key_only() {
        let mut root = Level::default();
        root.insert("k", ValueMatch::Any, limited("any", 1))
            .unwrap();
        root.insert("k", ValueMatch::parse(Some("ab*")), limited("ab*", 2))
            .unwrap();
        root.insert("k", ValueMatch::parse(Some("a*")), limited("a*", 3))
            .unwrap();
        root.insert("k", ValueMatch::parse(Some("x*y*z")), limited("x*y*z", 5))
            .unwrap();
        root.insert("k", ValueMatch::Exact("abc".into()), limited("abc", 4))
            .unwrap();
        let mut rs = RuleSet::new();
        rs.insert_domain("d", root);
        assert_eq!(path_of(&rs, &[e("k", "abc")]).as_deref(), Some("abc"));
        assert_eq!(path_of(&rs, &[e("k", "abd")]).as_deref(), Some("ab*"));
        assert_eq!(path_of(&rs, &[e("k", "axe")]).as_deref(), Some("a*"));
        assert_eq!(path_of(&rs, &[e("k", "zzz")]).as_deref(), Some("any"));
        assert_eq!(path_of(&rs, &[e("k", "x-y-z")]).as_deref(), Some("x*y*z"));
        assert_eq!(path_of(&rs, &[e("k", "x-z-y")]).as_deref(), Some("any"));
        assert_eq!(path_of(&rs, &[e("other", "zzz")]), None);
        assert!(rs.lookup("unknown", &[e("k", "abc")]).is_none());
    }

    #[test]
    fn limit_applies_only_at_the_depth_of_the_last_entry() {
        let mut child = Level::default();
        child
            .insert("sub", ValueMatch::Any, limited("deep", 5))
            .unwrap();
        let mut parent = limited("shallow", 9);
        parent.children = child;
        let mut root = Level::default();
        root.insert("k", ValueMatch::Exact("v".into()), parent)
            .unwrap();
        let mut rs = RuleSet::new();
        rs.insert_domain("d", root);
        assert_eq!(path_of(&rs, &[e("k", "v")]).as_deref(), Some("shallow"));
        assert_eq!(
            path_of(&rs, &[e("k", "v"), e("sub", "x")]).as_deref(),
            Some("deep")
        );
        assert_eq!(
            path_of(&rs, &[e("k", "v"), e("sub", "x"), e("more", "y")]),
            None
        );
        assert_eq!(path_of(&rs, &[e("k", "v"), e("nope", "x")]), None);
    }

    #[test]
    fn a_value_without_a_limit_whitelists_it() {
        let mut root = Level::default();
        root.insert("client", ValueMatch::Any, limited("per-client", 1))
            .unwrap();
        root.insert(
            "client",
            ValueMatch::Exact("internal".into()),
            Node::default(),
        )
        .unwrap();
        let mut rs = RuleSet::new();
        rs.insert_domain("d", root);
        assert_eq!(path_of(&rs, &[e("client", "internal")]), None);
        assert_eq!(
            path_of(&rs, &[e("client", "x")]).as_deref(),
            Some("per-client")
        );
    }

    #[test]
    fn a_key_uses_its_tenants_tree_then_its_plans_then_the_domains() {
        let tree = |path: &str, n| {
            let mut root = Level::default();
            root.insert("api_key", ValueMatch::Any, limited(path, n))
                .unwrap();
            root
        };
        let mut rs = RuleSet::new();
        rs.insert_domain("d", tree("default", 1));
        assert!(rs.insert_scoped(Scope::Plan("pro"), "d", tree("pro", 2)));
        assert!(!rs.insert_scoped(Scope::Plan("pro"), "d", tree("again", 2)));
        assert!(rs.insert_scoped(Scope::Tenant("acme"), "d", tree("acme", 3)));
        let key = |tenant: &str, plan: &str| ApiKey {
            tenant_id: "00000000-0000-0000-0000-000000000000".into(),
            tenant: tenant.into(),
            plan: plan.into(),
            monthly_quota: None,
            time_zone: chrono_tz::Tz::UTC,
        };
        let entries = [e("api_key", "k")];
        let path = |k: &ApiKey| {
            rs.lookup_for_key("d", k, &entries)
                .map(|m| m.rule.path.to_string())
        };
        assert_eq!(path(&key("acme", "pro")).as_deref(), Some("acme"));
        assert_eq!(path(&key("other", "pro")).as_deref(), Some("pro"));
        assert_eq!(path(&key("other", "free")).as_deref(), Some("default"));
        assert_eq!(rs.rules().len(), 3);
        assert!(rs.insert_api_key("ab", key("acme", "pro")));
        assert!(!rs.insert_api_key("ab", key("acme", "pro")));
        assert_eq!(rs.api_key("ab").map(|k| &*k.tenant), Some("acme"));
        assert!(rs.api_key("cd").is_none());
    }

    #[test]
    fn duplicates_are_refused() {
        let mut root = Level::default();
        root.insert("k", ValueMatch::Exact("v".into()), Node::default())
            .unwrap();
        assert!(root
            .insert("k", ValueMatch::Exact("v".into()), Node::default())
            .is_err());
        root.insert("k", ValueMatch::Any, Node::default()).unwrap();
        assert!(root.insert("k", ValueMatch::Any, Node::default()).is_err());
    }
}
