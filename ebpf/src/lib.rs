#![no_std]
// Exists so that cargo knows the package has a library target (daemon/build.rs depends on it).
