//! No party takes over another: a compromised site reaches only its own replicas at its peer
//! (peer credentials), a Site's author reaches only the Secrets labelled for that Site, and a
//! namespace reaches only the site VMs it protected. Real API server, real agents, real
//! controller; one binary, so the suite links the library once for all of them.

#[path = "../controller_common/mod.rs"]
mod common;
#[path = "../hostile/mod.rs"]
mod hostile;

mod peer_credentials;
mod site_secrets;
mod tenancy;
