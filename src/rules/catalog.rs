//! What sluice reads from PostgreSQL, as plain data: plans, tenants, live
//! API keys and rule rows. [`Catalog::compile`] turns it into a [`RuleSet`]
//! through the YAML validator, so a rule row means exactly what the same
//! descriptor means in a YAML file, with the same error messages.
//!
//! No I/O here: `rules::postgres` fills a catalog from the database (the
//! rows derive `sqlx::FromRow` for it), and the local snapshot file is a
//! catalog serialized as JSON.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use super::yaml::{self, YamlDescriptor, YamlRateLimit, YamlReplaces, YamlRoot};
use super::{RuleError, RuleErrors};
use crate::limiter::{ApiKey, Metadata, RuleSet, Scope};

/// Everything a running sluice needs from PostgreSQL, read in one
/// consistent snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Catalog {
    pub plans: Vec<PlanRow>,
    pub tenants: Vec<TenantRow>,
    /// Live (not revoked) keys only.
    pub keys: Vec<KeyRow>,
    /// Ordered by domain, scope and position.
    pub rules: Vec<RuleRow>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow)]
pub struct PlanRow {
    pub name: String,
    pub monthly_quota: Option<i64>,
    /// Set: the quota is soft (overage is billed, not denied).
    #[serde(default)]
    pub overage_cents_per_1000: Option<i64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow)]
pub struct TenantRow {
    pub id: String,
    pub name: String,
    pub plan: String,
    /// IANA name of the zone of the tenant's billing cycles.
    #[serde(default = "utc")]
    pub time_zone: String,
}

fn utc() -> String {
    "UTC".to_owned()
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow)]
pub struct KeyRow {
    /// Keyed BLAKE3 hex of the raw key.
    pub hash: String,
    pub tenant_id: String,
    /// The key's own plan, overriding its tenant's for its limits.
    pub plan: Option<String>,
}

/// Whose rules a set of rows is.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum RuleScope {
    /// The domain's own rules.
    #[default]
    Domain,
    Plan(String),
    /// By tenant name.
    Tenant(String),
}

impl RuleScope {
    /// Names the scope in error messages and rule paths: `business`,
    /// `business[plan=free]`, `business[tenant=acme]`.
    pub fn label(&self, domain: &str) -> String {
        match self {
            RuleScope::Domain => domain.to_owned(),
            RuleScope::Plan(p) => format!("{domain}[plan={p}]"),
            RuleScope::Tenant(t) => format!("{domain}[tenant={t}]"),
        }
    }
}

/// One node of a descriptor tree (one YAML descriptor), flattened. The
/// skipped fields are stored in another shape; `rules::postgres` maps them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow)]
pub struct RuleRow {
    pub domain: String,
    #[sqlx(skip)]
    pub scope: RuleScope,
    /// Pre-order index within (domain, scope): the file order.
    pub position: i32,
    /// (key, value) from the root; an empty value matches any value.
    #[sqlx(skip)]
    pub path: Vec<(String, String)>,
    pub unit: Option<String>,
    pub requests_per_unit: Option<i64>,
    pub unlimited: bool,
    pub algorithm: Option<String>,
    pub burst: Option<i64>,
    pub name: Option<String>,
    pub replaces: Vec<String>,
    pub shadow_mode: bool,
    pub quota_mode: bool,
    pub detailed_metric: bool,
    pub value_to_metric: bool,
    pub share_threshold: bool,
    #[sqlx(skip)]
    pub metadata: Metadata,
}

// === YAML -> rows ===

/// Refuses what rule rows cannot hold yet: sluice's window extensions
/// (`rate_limits`, `unit_multiplier`, `calendar`, `time_zone`), which
/// [`rows_from_yaml`] would otherwise drop without a word. Such rules are
/// served from YAML files.
pub fn check_storable(file: &str, root: &YamlRoot) -> Result<(), RuleErrors> {
    fn walk(file: &str, descriptors: &[YamlDescriptor], parent: &str, errors: &mut Vec<RuleError>) {
        for (i, d) in descriptors.iter().enumerate() {
            let path = if parent.is_empty() {
                format!("descriptors[{i}]")
            } else {
                format!("{parent}.descriptors[{i}]")
            };
            let mut fields = Vec::new();
            if d.rate_limits.is_some() {
                fields.push("rate_limits");
            }
            if let Some(rl) = &d.rate_limit {
                if rl.unit_multiplier.is_some() {
                    fields.push("unit_multiplier");
                }
                if rl.calendar.is_some() {
                    fields.push("calendar");
                }
                if rl.time_zone.is_some() {
                    fields.push("time_zone");
                }
            }
            if !fields.is_empty() {
                errors.push(RuleError {
                    file: file.to_owned(),
                    path: path.clone(),
                    message: format!(
                        "{} cannot be stored in PostgreSQL rules yet; serve this rule from a YAML file",
                        fields.join(", ")
                    ),
                });
            }
            walk(file, &d.descriptors, &path, errors);
        }
    }
    let mut errors = Vec::new();
    walk(file, &root.descriptors, "", &mut errors);
    if errors.is_empty() {
        Ok(())
    } else {
        Err(RuleErrors(errors))
    }
}

/// Flattens a parsed (and validated) YAML file into rows, in file order.
/// Units are stored in lower case, as the schema requires.
pub fn rows_from_yaml(root: &YamlRoot, scope: &RuleScope) -> Vec<RuleRow> {
    let domain = root.domain.clone().unwrap_or_default();
    let mut rows = Vec::new();
    let mut path = Vec::new();
    flatten(&root.descriptors, &domain, scope, &mut path, &mut rows);
    rows
}

fn flatten(
    descriptors: &[YamlDescriptor],
    domain: &str,
    scope: &RuleScope,
    path: &mut Vec<(String, String)>,
    rows: &mut Vec<RuleRow>,
) {
    for d in descriptors {
        path.push((
            d.key.clone().unwrap_or_default(),
            d.value.clone().unwrap_or_default(),
        ));
        let rl = d.rate_limit.clone().unwrap_or_default();
        rows.push(RuleRow {
            domain: domain.to_owned(),
            scope: scope.clone(),
            position: i32::try_from(rows.len()).unwrap_or(i32::MAX),
            path: path.clone(),
            unit: rl
                .unit
                .filter(|u| !u.is_empty())
                .map(|u| u.to_ascii_lowercase()),
            requests_per_unit: rl
                .requests_per_unit
                .map(|n| i64::try_from(n).unwrap_or(i64::MAX)),
            unlimited: rl.unlimited,
            algorithm: rl.algorithm,
            burst: rl.burst.map(|n| i64::try_from(n).unwrap_or(i64::MAX)),
            name: rl.name.filter(|n| !n.is_empty()),
            replaces: rl.replaces.into_iter().filter_map(|r| r.name).collect(),
            shadow_mode: d.shadow_mode,
            quota_mode: d.quota_mode,
            detailed_metric: d.detailed_metric,
            value_to_metric: d.value_to_metric,
            share_threshold: d.share_threshold,
            metadata: d.metadata.clone(),
        });
        flatten(&d.descriptors, domain, scope, path, rows);
        path.pop();
    }
}

// === rows -> YAML ===

/// Rebuilds one domain's YAML tree from its rows (one scope, in position
/// order). A row whose parent is missing is an error naming it.
pub fn yaml_from_rows(domain: &str, file: &str, rows: &[&RuleRow]) -> Result<YamlRoot, RuleErrors> {
    let mut root = YamlRoot {
        domain: Some(domain.to_owned()),
        descriptors: Vec::new(),
    };
    let mut errors = Vec::new();
    for row in rows {
        let Some(((key, value), parents)) = row.path.split_last() else {
            errors.push(row_error(file, row, "rule row has an empty path"));
            continue;
        };
        let mut level = &mut root.descriptors;
        let mut missing = false;
        for (k, v) in parents {
            let found = level
                .iter()
                .position(|d| d.key.as_deref() == Some(k) && d.value.as_deref().unwrap_or("") == v);
            match found {
                Some(i) => level = &mut level[i].descriptors,
                None => {
                    missing = true;
                    break;
                }
            }
        }
        if missing {
            errors.push(row_error(
                file,
                row,
                "rule row has no parent row (every prefix of a path needs its own row)",
            ));
            continue;
        }
        level.push(descriptor_from_row(key, value, row));
    }
    if errors.is_empty() {
        Ok(root)
    } else {
        Err(RuleErrors(errors))
    }
}

fn row_error(file: &str, row: &RuleRow, message: &str) -> RuleError {
    let path: Vec<String> = row
        .path
        .iter()
        .map(|(k, v)| {
            if v.is_empty() {
                k.clone()
            } else {
                format!("{k}={v}")
            }
        })
        .collect();
    RuleError {
        file: file.to_owned(),
        path: format!("position {} ({})", row.position, path.join(", ")),
        message: message.to_owned(),
    }
}

fn descriptor_from_row(key: &str, value: &str, row: &RuleRow) -> YamlDescriptor {
    let has_limit = row.unlimited || row.unit.is_some() || row.requests_per_unit.is_some();
    YamlDescriptor {
        key: Some(key.to_owned()),
        value: (!value.is_empty()).then(|| value.to_owned()),
        rate_limit: has_limit.then(|| YamlRateLimit {
            unit: row.unit.clone(),
            requests_per_unit: row.requests_per_unit.map(|n| u64::try_from(n).unwrap_or(0)),
            unlimited: row.unlimited,
            name: row.name.clone(),
            replaces: row
                .replaces
                .iter()
                .map(|n| YamlReplaces {
                    name: Some(n.clone()),
                })
                .collect(),
            algorithm: row.algorithm.clone(),
            burst: row.burst.map(|n| u64::try_from(n).unwrap_or(0)),
            unit_multiplier: None,
            calendar: None,
            time_zone: None,
        }),
        rate_limits: None,
        descriptors: Vec::new(),
        shadow_mode: row.shadow_mode,
        quota_mode: row.quota_mode,
        detailed_metric: row.detailed_metric,
        value_to_metric: row.value_to_metric,
        share_threshold: row.share_threshold,
        metadata: row.metadata.clone(),
    }
}

// === catalog -> RuleSet ===

impl Catalog {
    /// Validates everything and builds the rule set with its API keys.
    /// Any error refuses the whole catalog.
    pub fn compile(&self) -> Result<RuleSet, RuleErrors> {
        let mut errors = Vec::new();
        let mut set = RuleSet::new();

        // Group rows by (domain, scope), keeping position order.
        let mut groups: BTreeMap<(&str, &RuleScope), Vec<&RuleRow>> = BTreeMap::new();
        for row in &self.rules {
            groups
                .entry((&row.domain, &row.scope))
                .or_default()
                .push(row);
        }
        for rows in groups.values_mut() {
            rows.sort_by_key(|r| r.position);
        }
        for ((domain, scope), rows) in &groups {
            let label = scope.label(domain);
            let file = format!("postgres:{label}");
            let root = match yaml_from_rows(domain, &file, rows) {
                Ok(root) => root,
                Err(RuleErrors(mut e)) => {
                    errors.append(&mut e);
                    continue;
                }
            };
            // Scoped rules compile under their label, so their paths (and
            // metric labels) say whose they are.
            let labelled = YamlRoot {
                domain: Some(label),
                descriptors: root.descriptors,
            };
            match yaml::compile(&file, &labelled) {
                Ok((_, level)) => {
                    let inserted = match scope {
                        RuleScope::Domain => set.insert_domain(domain, level),
                        RuleScope::Plan(p) => set.insert_scoped(Scope::Plan(p), domain, level),
                        RuleScope::Tenant(t) => set.insert_scoped(Scope::Tenant(t), domain, level),
                    };
                    debug_assert!(inserted, "groups are unique");
                }
                Err(RuleErrors(mut e)) => errors.append(&mut e),
            }
        }
        // A domain with only scoped rules still counts as known.
        for (domain, _) in groups.keys() {
            if !set.has_domain(domain) {
                set.insert_domain(domain, Default::default());
            }
        }

        // The quota a key enforces: none when the plan bills overage.
        let quotas: HashMap<&str, Option<i64>> = self
            .plans
            .iter()
            .map(|p| {
                let enforced = p
                    .monthly_quota
                    .filter(|_| p.overage_cents_per_1000.is_none());
                (p.name.as_str(), enforced)
            })
            .collect();
        let tenants: HashMap<&str, &TenantRow> =
            self.tenants.iter().map(|t| (t.id.as_str(), t)).collect();
        for key in &self.keys {
            let Some(tenant) = tenants.get(key.tenant_id.as_str()) else {
                errors.push(key_error(key, "its tenant is missing"));
                continue;
            };
            let plan = key.plan.as_deref().unwrap_or(&tenant.plan);
            let Some(quota) = quotas.get(tenant.plan.as_str()) else {
                errors.push(key_error(key, "its tenant's plan is missing"));
                continue;
            };
            if !quotas.contains_key(plan) {
                errors.push(key_error(key, "its plan is missing"));
                continue;
            }
            let api_key = ApiKey {
                tenant_id: tenant.id.as_str().into(),
                tenant: tenant.name.as_str().into(),
                plan: plan.into(),
                monthly_quota: quota.and_then(|q| u32::try_from(q).ok()),
                // PostgreSQL checks the name when it is set; a zone this
                // build does not know counts in UTC rather than refusing keys.
                time_zone: tenant.time_zone.parse().unwrap_or(chrono_tz::Tz::UTC),
            };
            if !set.insert_api_key(&key.hash, api_key) {
                errors.push(key_error(key, "duplicate key hash"));
            }
        }

        if errors.is_empty() {
            Ok(set)
        } else {
            Err(RuleErrors(errors))
        }
    }

    /// A digest of the content, to skip reloads that change nothing.
    pub fn fingerprint(&self) -> [u8; 32] {
        let json = serde_json::to_vec(self).unwrap_or_default();
        *blake3::hash(&json).as_bytes()
    }
}

fn key_error(key: &KeyRow, message: &str) -> RuleError {
    RuleError {
        file: "postgres:api_keys".into(),
        path: format!("key {}…", key.hash.get(..8).unwrap_or(&key.hash)),
        message: message.into(),
    }
}

#[cfg(test)]
mod tests;
