//! Tenancy, decided without I/O: a site VM belongs to one namespace's ReplicatedVM, and a Site
//! may list the namespaces allowed to use it. A ReplicatedVM refused here makes no site call at
//! all (neither its jobs nor its deletion); its status says why.

use jiff::Timestamp;
use kube::ResourceExt;

use crate::api::{ReplicatedVM, ReplicatedVMStatus};
use crate::controller::conditions::{self, Cond, READY, RECONCILING, STALLED};

/// Ready's and Stalled's reason when another namespace's ReplicatedVM holds the VM.
pub const OWNED_ELSEWHERE: &str = crate::site::VM_OWNED_BY_OTHER_NAMESPACE;
/// Ready's and Stalled's reason when a Site's `spec.allowedNamespaces` leaves the namespace out.
pub const NAMESPACE_NOT_ALLOWED: &str = "NamespaceNotAllowed";

/// What tenancy needs of a ReplicatedVM: who it is, when it came, which VM at which sites.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    pub namespace: String,
    pub name: String,
    pub created: Option<Timestamp>,
    pub vm: String,
    pub sites: [String; 2],
}

impl Claim {
    pub fn of(rvm: &ReplicatedVM) -> Self {
        Self {
            namespace: rvm.namespace().unwrap_or_default(),
            name: rvm.name_any(),
            created: rvm
                .metadata
                .creation_timestamp
                .as_ref()
                .and_then(|t| Timestamp::from_second(t.0.as_second()).ok()),
            vm: rvm.vm_name(),
            sites: [
                rvm.spec.primary_site.clone(),
                rvm.spec.recovery_site.clone(),
            ],
        }
    }

    /// Created before `other`: the older object holds the VM (ties by namespace, then name).
    fn before(&self, other: &Self) -> bool {
        let key = |c: &Self| {
            (
                c.created.unwrap_or(Timestamp::MAX),
                c.namespace.clone(),
                c.name.clone(),
            )
        };
        key(self) < key(other)
    }
}

/// Why `me` may not act, if it may not: a site it names does not allow its namespace
/// (`allowed(site)` is the Site's `spec.allowedNamespaces`, empty for all), a site it names
/// shows the VM owned by another namespace (`owner(site)`, what the agent recorded), or a
/// ReplicatedVM of another namespace created before it names the same VM at one of its sites.
pub fn refusal(
    me: &Claim,
    all: &[Claim],
    allowed: impl Fn(&str) -> Vec<String>,
    owner: impl Fn(&str) -> Option<String>,
) -> Option<(&'static str, String)> {
    for site in &me.sites {
        if let Some(message) = not_allowed(&me.namespace, site, &allowed(site)) {
            return Some((NAMESPACE_NOT_ALLOWED, message));
        }
    }
    let mut recorded_mine = false;
    for site in &me.sites {
        match owner(site) {
            Some(o) if o != me.namespace => {
                return Some((OWNED_ELSEWHERE, owned_by(&me.vm, site, &o)));
            }
            Some(_) => recorded_mine = true,
            None => {}
        }
    }
    // The agents' record decides over the order of creation: an older object of another
    // namespace does not take a VM a site holds for this one.
    if recorded_mine {
        return None;
    }
    let owner = all
        .iter()
        .filter(|o| o.namespace != me.namespace && o.vm == me.vm && o.before(me))
        .filter_map(|o| {
            let site = me.sites.iter().find(|s| o.sites.contains(s))?;
            Some((o, site))
        })
        .min_by(|(a, _), (b, _)| {
            if a.before(b) {
                std::cmp::Ordering::Less
            } else {
                std::cmp::Ordering::Greater
            }
        });
    owner.map(|(o, site)| (OWNED_ELSEWHERE, owned_by(&me.vm, site, &o.namespace)))
}

fn owned_by(vm: &str, site: &str, owner: &str) -> String {
    format!(
        "VM {vm} at Site {site} belongs to a ReplicatedVM of namespace {owner}, which protected it \
         first; this ReplicatedVM changes nothing at the sites (no replication, power, failover \
         or deletion of that VM). Set spec.vmName to a VM of your own, or have namespace {owner} \
         delete its ReplicatedVM first"
    )
}

/// Why namespace `ns` may not use Site `site`, whose `spec.allowedNamespaces` is `allowed`
/// (empty: every namespace), if it may not.
pub fn not_allowed(ns: &str, site: &str, allowed: &[String]) -> Option<String> {
    if allowed.is_empty() || allowed.iter().any(|a| a == ns) {
        return None;
    }
    Some(format!(
        "namespace {ns} may not use Site {site}: the Site's spec.allowedNamespaces ({}) does not \
         list it; nothing is done at the sites. Name another Site, or ask the Site's owner to \
         add {ns} to spec.allowedNamespaces",
        allowed.join(", ")
    ))
}

/// The status of a refused ReplicatedVM: Ready False and Stalled True with the reason (a
/// person decides), Reconciling False.
pub fn refused(
    st: &ReplicatedVMStatus,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: Timestamp,
) -> ReplicatedVMStatus {
    let mut new = st.clone();
    conditions::set_all(
        &mut new.conditions,
        &[
            Cond::new(READY, false, reason, message),
            Cond::new(RECONCILING, false, reason, message),
            Cond::new(STALLED, true, reason, message),
        ],
        generation,
        now,
    );
    new.observed_generation = generation.or(new.observed_generation);
    new
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(ns: &str, name: &str, secs: i64, vm: &str, sites: [&str; 2]) -> Claim {
        Claim {
            namespace: ns.into(),
            name: name.into(),
            created: Some(Timestamp::from_second(secs).unwrap()),
            vm: vm.into(),
            sites: sites.map(String::from),
        }
    }

    const AB: [&str; 2] = ["site-a", "site-b"];

    fn unowned(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn a_vm_the_agent_shows_owned_by_another_namespace_is_refused() {
        let b = claim("team-b", "web", 20, "web", AB);
        let none = |_: &str| Vec::new();
        let owned = |s: &str| (s == "site-b").then(|| "team-a".to_string());
        let (reason, msg) = refusal(&b, std::slice::from_ref(&b), none, owned).expect("refused");
        assert_eq!(reason, OWNED_ELSEWHERE);
        assert!(msg.contains("Site site-b"), "{msg}");
        assert!(msg.contains("namespace team-a"), "{msg}");
        // Its own namespace's record is no refusal, even beside an older object of another
        // namespace naming the VM (the record decides).
        let mine = |_: &str| Some("team-b".to_string());
        assert_eq!(refusal(&b, std::slice::from_ref(&b), none, mine), None);
        let older = claim("team-c", "web", 5, "web", AB);
        assert_eq!(refusal(&b, &[older.clone(), b.clone()], none, mine), None);
        let (_, msg) = refusal(&b, &[older, b.clone()], none, unowned).expect("refused");
        assert!(msg.contains("namespace team-c"), "{msg}");
    }

    #[test]
    fn the_first_namespace_holds_a_vm_and_the_later_one_is_refused() {
        let a = claim("team-a", "web", 10, "web", AB);
        let b = claim("team-b", "web", 20, "web", AB);
        let all = [a.clone(), b.clone()];
        let none = |_: &str| Vec::new();
        assert_eq!(refusal(&a, &all, none, unowned), None);
        let (reason, msg) = refusal(&b, &all, none, unowned).expect("refused");
        assert_eq!(reason, OWNED_ELSEWHERE);
        assert!(msg.contains("namespace team-a"), "{msg}");
        assert!(msg.contains("spec.vmName"), "{msg}");
    }

    #[test]
    fn only_the_same_vm_at_a_shared_site_of_another_namespace_counts() {
        let a = claim("team-a", "web", 10, "web", AB);
        let none = |_: &str| Vec::new();
        // Another VM name, other sites, or the same namespace: no refusal.
        for other in [
            claim("team-b", "web", 20, "db", AB),
            claim("team-b", "web", 20, "web", ["site-c", "site-d"]),
            claim("team-a", "web-2", 20, "web", AB),
        ] {
            assert_eq!(
                refusal(&other, &[a.clone(), other.clone()], none, unowned),
                None,
                "{other:?}"
            );
        }
        // One shared site is enough: that is where the VM is.
        let b = claim("team-b", "web", 20, "web", ["site-c", "site-a"]);
        let (_, msg) = refusal(&b, &[a, b.clone()], none, unowned).expect("refused");
        assert!(msg.contains("Site site-a"), "{msg}");
    }

    #[test]
    fn a_site_that_lists_namespaces_refuses_the_others() {
        let b = claim("team-b", "web", 20, "web", AB);
        let allowed = |s: &str| {
            if s == "site-b" {
                vec!["team-a".to_string()]
            } else {
                Vec::new()
            }
        };
        let (reason, msg) =
            refusal(&b, std::slice::from_ref(&b), allowed, unowned).expect("refused");
        assert_eq!(reason, NAMESPACE_NOT_ALLOWED);
        assert!(msg.contains("spec.allowedNamespaces"), "{msg}");
        assert!(msg.contains("Site site-b"), "{msg}");
        let a = claim("team-a", "web", 20, "web", AB);
        assert_eq!(
            refusal(&a, std::slice::from_ref(&a), allowed, unowned),
            None
        );
    }
}
