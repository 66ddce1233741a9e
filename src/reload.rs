//! Reload: read `gateway.toml` again, validate, build a whole new snapshot off the
//! hot path and swap it in atomically. A failed reload changes nothing.

use std::sync::Arc;

use crate::config::Config;
use crate::server::Shared;
use crate::snapshot::Snapshot;

/// Reloads the file the gateway was started with. Returns the new version, or the
/// error message (`PATH:LINE:COL: message` lines) while the old config keeps serving.
pub fn reload(shared: &Shared) -> Result<String, String> {
    let new = Config::load(&shared.config.path).map_err(|e| e.to_string())?;
    let old = &shared.config;
    let mut restart = Vec::new();
    if new.listen != old.listen {
        restart.push("server.listen");
    }
    if new.admin_listen != old.admin_listen {
        restart.push("server.admin_listen");
    }
    if new.workers != old.workers {
        restart.push("server.workers");
    }
    if !restart.is_empty() {
        return Err(format!(
            "{}: {} changed; these need a restart, so nothing from this file was applied",
            old.path.display(),
            restart.join(", ")
        ));
    }
    let snapshot = Snapshot::build(&new).map_err(|e| format!("{}: {e}", old.path.display()))?;
    let version = snapshot.version.clone();
    shared.snapshot.store(Arc::new(snapshot));
    Ok(version)
}
