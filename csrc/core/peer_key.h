// Per-peer keys (AgentInfo::peer_keys): where the owner published `base`, a writer writes with peer_key(base, salt),
// salt = writer_salt(its epoch, the owner's link number for this adding of it). A 64-bit mix, never 0 ("not
// registered"), so each writer's keys are its own, a new incarnation's differ, and so do those of the same
// incarnation added again: what it still posts for an association that ended meets keys that stay closed.
// Header-only: the UCX plugin derives them too, to check a write's keys before it leaves.
#pragma once
#include <cstdint>

namespace kvxfer {

// owner_link: PeerState::link on the owner's side, which its HELLO carries to the writer (never 0).
inline uint64_t writer_salt(uint64_t writer_epoch, uint32_t owner_link) {
  return writer_epoch ^ (uint64_t{owner_link} * 0xd1b54a32d192ed03ull);
}

inline uint64_t peer_key(uint64_t base, uint64_t salt) {
  uint64_t z = base ^ (salt * 0x9e3779b97f4a7c15ull);  // splitmix64's finalizer over both
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  return z ? z : 1;
}

}  // namespace kvxfer
