// REST client: JSON in and out, tokens kept in localStorage and refreshed silently.
// Errors are thrown as ApiError carrying the server's {error: {code, message, details}} body.

const TOKENS_KEY = "chatstream.tokens";

export class ApiError extends Error {
  constructor(status, body) {
    const err = (body && body.error) || {};
    super(err.message || `request failed (${status})`);
    this.status = status;
    this.code = err.code || "http_" + status;
    this.details = err.details || {};
  }
}

export function tokensLoad() {
  try { return JSON.parse(localStorage.getItem(TOKENS_KEY)) || null; } catch { return null; }
}

export function tokensSave(tokens) {
  if (tokens) localStorage.setItem(TOKENS_KEY, JSON.stringify(tokens));
  else localStorage.removeItem(TOKENS_KEY);
}

function tokenExpiry(token) {
  try {
    const payload = JSON.parse(atob(token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/")));
    return payload.exp * 1000;
  } catch { return 0; }
}

let refreshing = null; // one refresh at a time: parallel 401s wait for the same new pair

async function refreshTokens() {
  const tokens = tokensLoad();
  if (!tokens || !tokens.refresh) throw new ApiError(401, { error: { code: "unauthenticated", message: "please log in" } });
  if (!refreshing) {
    refreshing = (async () => {
      const res = await fetch("/api/v1/auth/refresh", {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ refresh: tokens.refresh }),
      });
      const body = await res.json().catch(() => ({}));
      if (!res.ok) { tokensSave(null); throw new ApiError(res.status, body); }
      tokensSave({ access: body.access, refresh: body.refresh });
    })().finally(() => { refreshing = null; });
  }
  return refreshing;
}

export async function api(method, path, body, { auth = true, retried = false } = {}) {
  const headers = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (auth) {
    let tokens = tokensLoad();
    // Refresh a little before expiry rather than paying a 401 round trip.
    if (tokens && tokenExpiry(tokens.access) - Date.now() < 30_000) { await refreshTokens(); tokens = tokensLoad(); }
    if (tokens) headers.Authorization = `Bearer ${tokens.access}`;
  }
  const res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const data = res.status === 204 ? {} : await res.json().catch(() => ({}));
  if (res.status === 401 && auth && !retried) {
    await refreshTokens();
    return api(method, path, body, { auth, retried: true });
  }
  if (!res.ok) throw new ApiError(res.status, data);
  return data;
}

// Lists come back either bare or wrapped by a paginator; the client accepts both.
export function listOf(data, ...keys) {
  if (Array.isArray(data)) return data;
  for (const key of ["results", "items", ...keys]) if (Array.isArray(data && data[key])) return data[key];
  return [];
}
