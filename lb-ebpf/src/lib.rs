#![no_std]
// Library target so lb-userspace can list this crate as a build-dependency.
