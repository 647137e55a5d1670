//! libvirt's checkpoint and backup calls, which the `virt` binding does not wrap: thin safe
//! functions over `virt-sys`.

use std::ffi::{CStr, CString};

use virt::domain::Domain;
use virt::error::ErrorNumber;
use virt::sys;

/// The last libvirt error of this thread, as text.
fn last_error() -> String {
    virt::error::Error::last_error().message().to_string()
}

fn cstring(what: &str, s: &str) -> Result<CString, String> {
    CString::new(s).map_err(|_| format!("{what} contains a NUL byte"))
}

/// Why a backup did not begin.
#[derive(Debug)]
pub struct BeginError {
    pub message: String,
    /// The incremental checkpoint is gone or broken (libvirt's `VIR_ERR_CHECKPOINT_INCONSISTENT`,
    /// `VIR_ERR_NO_DOMAIN_CHECKPOINT`): no backup can start from it. Anything else (another job,
    /// a lock timeout, libvirtd restarting) may pass on a retry.
    pub checkpoint_lost: bool,
}

/// Starts a pull-mode backup job (`backup_xml`) and the checkpoint `checkpoint_xml` at the
/// same instant.
pub fn backup_begin(d: &Domain, backup_xml: &str, checkpoint_xml: &str) -> Result<(), BeginError> {
    let other = |message| BeginError {
        message,
        checkpoint_lost: false,
    };
    let b = cstring("backup XML", backup_xml).map_err(other)?;
    let c = cstring("checkpoint XML", checkpoint_xml).map_err(other)?;
    // SAFETY: `d` is a live domain handle; both strings outlive the call.
    let rc = unsafe { sys::virDomainBackupBegin(d.as_ptr(), b.as_ptr(), c.as_ptr(), 0) };
    if rc >= 0 {
        return Ok(());
    }
    let e = virt::error::Error::last_error();
    Err(BeginError {
        message: e.message().to_string(),
        checkpoint_lost: matches!(
            e.code(),
            ErrorNumber::CheckpointInconsistent
                | ErrorNumber::NoDomainCheckpoint
                | ErrorNumber::InvalidDomainCheckpoint
        ),
    })
}

/// The XML of the domain's running backup job.
pub fn backup_xml(d: &Domain) -> Result<String, String> {
    // SAFETY: `d` is a live domain handle; the returned string is malloc'ed by libvirt and
    // freed here after it is copied.
    unsafe {
        let p = sys::virDomainBackupGetXMLDesc(d.as_ptr(), 0);
        if p.is_null() {
            return Err(last_error());
        }
        let s = CStr::from_ptr(p).to_string_lossy().into_owned();
        libc::free(p.cast());
        Ok(s)
    }
}

/// Ends the domain's job (a pull backup ends this way).
pub fn abort_job(d: &Domain) -> Result<(), String> {
    // SAFETY: `d` is a live domain handle.
    let rc = unsafe { sys::virDomainAbortJob(d.as_ptr()) };
    if rc < 0 { Err(last_error()) } else { Ok(()) }
}

/// Creates a checkpoint from `xml`.
pub fn create(d: &Domain, xml: &str) -> Result<(), String> {
    let x = cstring("checkpoint XML", xml)?;
    // SAFETY: `d` is a live domain handle; `x` outlives the call. The returned handle is freed.
    let cp = unsafe { sys::virDomainCheckpointCreateXML(d.as_ptr(), x.as_ptr(), 0) };
    if cp.is_null() {
        return Err(last_error());
    }
    // SAFETY: `cp` is the handle just returned.
    unsafe { sys::virDomainCheckpointFree(cp) };
    Ok(())
}

/// Gives libvirt the checkpoint `xml` whose bitmaps exist already in the images (a domain that
/// is off, where libvirt creates none itself).
pub fn redefine(d: &Domain, xml: &str) -> Result<(), String> {
    let x = cstring("checkpoint XML", xml)?;
    // SAFETY: `d` is a live domain handle; `x` outlives the call. The returned handle is freed.
    let cp = unsafe {
        sys::virDomainCheckpointCreateXML(
            d.as_ptr(),
            x.as_ptr(),
            sys::VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE,
        )
    };
    if cp.is_null() {
        return Err(last_error());
    }
    // SAFETY: `cp` is the handle just returned.
    unsafe { sys::virDomainCheckpointFree(cp) };
    Ok(())
}

/// Names of every checkpoint of the domain.
pub fn list(d: &Domain) -> Result<Vec<String>, String> {
    let mut arr: *mut sys::virDomainCheckpointPtr = std::ptr::null_mut();
    // SAFETY: libvirt allocates `arr` and `n` handles in it; each is freed below, then the
    // array itself with free().
    let n = unsafe { sys::virDomainListAllCheckpoints(d.as_ptr(), &mut arr, 0) };
    if n < 0 {
        return Err(last_error());
    }
    let mut names = Vec::new();
    for i in 0..n as usize {
        // SAFETY: `i < n`, so the element is one of the handles libvirt returned.
        unsafe {
            let cp = *arr.add(i);
            let name = sys::virDomainCheckpointGetName(cp);
            if !name.is_null() {
                names.push(CStr::from_ptr(name).to_string_lossy().into_owned());
            }
            sys::virDomainCheckpointFree(cp);
        }
    }
    if !arr.is_null() {
        // SAFETY: the array was allocated by libvirt with malloc.
        unsafe { libc::free(arr.cast()) };
    }
    Ok(names)
}

/// Deletes checkpoint `name`; its changes are merged into its parent's bitmap. A checkpoint
/// that does not exist is not an error.
pub fn delete(d: &Domain, name: &str) -> Result<(), String> {
    delete_with(d, name, 0)
}

/// Forgets checkpoint `name` in libvirt only, leaving the images alone (their bitmaps belong
/// to images the domain no longer uses).
pub fn forget(d: &Domain, name: &str) -> Result<(), String> {
    delete_with(d, name, sys::VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
}

fn delete_with(d: &Domain, name: &str, flags: u32) -> Result<(), String> {
    let n = cstring("checkpoint name", name)?;
    // SAFETY: `d` is a live domain handle; `n` outlives the call.
    let cp = unsafe { sys::virDomainCheckpointLookupByName(d.as_ptr(), n.as_ptr(), 0) };
    if cp.is_null() {
        return Ok(());
    }
    // SAFETY: `cp` is the handle just looked up; freed once after the delete.
    let rc = unsafe { sys::virDomainCheckpointDelete(cp, flags) };
    let err = (rc < 0).then(last_error);
    // SAFETY: as above.
    unsafe { sys::virDomainCheckpointFree(cp) };
    match err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
