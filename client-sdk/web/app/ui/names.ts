// How people are named on screen: the display name the server's roster gives
// (set by the organisation; "Guest" for guests) when there is one. Otherwise
// accounts' ids are opaque (32 hex digits), so they are shortened, and our own
// name is the one typed at sign-in. The full id stays available in tooltips
// and in the verify sheet, where exactness matters.

export type Namer = (userId: string) => string;

/** Opaque ids (long hex) shortened to their first 8 characters; readable ids as they are. */
export function shortId(userId: string): string {
  return /^[0-9a-f]{16,}$/i.test(userId) ? userId.slice(0, 8) : userId;
}

/** `displayNames` (user id → name) is read at each call, so it may be updated as rosters arrive. */
export function namer(selfUserId: string, selfName: string, displayNames: ReadonlyMap<string, string>): Namer {
  return (userId) => displayNames.get(userId) ?? (userId === selfUserId ? selfName : shortId(userId));
}
