// How people are named on screen. The engine gives user ids only; accounts'
// ids are opaque (32 hex digits), so they are shortened, and our own name is
// the one typed at sign-in. The full id stays available in tooltips and in the
// verify sheet, where exactness matters.

export type Namer = (userId: string) => string;

/** Opaque ids (long hex) shortened to their first 8 characters; readable ids as they are. */
export function shortId(userId: string): string {
  return /^[0-9a-f]{16,}$/i.test(userId) ? userId.slice(0, 8) : userId;
}

export function namer(selfUserId: string, selfName: string): Namer {
  return (userId) => (userId === selfUserId ? selfName : shortId(userId));
}
