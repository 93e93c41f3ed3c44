//! A stable 64-bit hash (FNV-1a with murmur3's finaliser) for ring hashing, request keys and
//! config digests: the same bytes hash alike across runs and builds.

pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

pub fn fnv(mut h: u64, data: &[u8]) -> u64 {
    for b in data {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// murmur3's 64-bit finaliser.
pub fn mix(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// FNV-1a, finished with murmur3's 64-bit mixer for an even spread. Stable across runs and
/// builds, unlike std's randomly seeded hasher.
pub fn hash_bytes(data: &[u8]) -> u64 {
    mix(fnv(FNV_OFFSET, data))
}

/// A digest of a value's `Hash` (std's SipHash with its fixed keys): the same within a build,
/// which is all that comparing config versions in one process needs.
pub fn digest<T: std::hash::Hash + ?Sized>(value: &T) -> u64 {
    use std::hash::Hasher;
    let mut h = std::hash::DefaultHasher::new();
    value.hash(&mut h);
    h.finish()
}
