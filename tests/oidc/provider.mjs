// The identity provider of the browser tests: a certified OpenID Connect provider
// (`oidc-provider`) on loopback, with its built-in development sign-in pages.
//
//   node provider.mjs PORT REDIRECT_URI
//
// PORT and REDIRECT_URI may also come from OIDC_PORT / OIDC_REDIRECT_URI; the client's id and
// secret from OIDC_CLIENT_ID / OIDC_CLIENT_SECRET (defaults below). Prints one line
// "oidc-provider ready ISSUER" once it listens. Started and stopped by tests/src/oidc.rs.
//
// Every login name is accepted with any password (development interactions). Known names get
// the claims below; any other name gets `NAME@example.com` and no groups.
import Provider from 'oidc-provider';

const port = Number(process.argv[2] ?? process.env.OIDC_PORT);
const redirectUri = process.argv[3] ?? process.env.OIDC_REDIRECT_URI;
const clientId = process.env.OIDC_CLIENT_ID ?? 'portcullis-test';
const clientSecret = process.env.OIDC_CLIENT_SECRET ?? 'portcullis-test-secret';
if (!Number.isInteger(port) || port <= 0 || port > 65535 || !redirectUri) {
  console.error('usage: node provider.mjs PORT REDIRECT_URI');
  process.exit(2);
}

const ACCOUNTS = {
  alice: { email: 'alice@example.com', name: 'Alice', groups: ['staff'] },
  bob: { email: 'bob@example.com', name: 'Bob', groups: ['guests'] },
};

const issuer = `http://127.0.0.1:${port}`;
const provider = new Provider(issuer, {
  clients: [
    {
      client_id: clientId,
      client_secret: clientSecret,
      redirect_uris: [redirectUri],
      grant_types: ['authorization_code'],
      response_types: ['code'],
      token_endpoint_auth_method: 'client_secret_basic',
    },
  ],
  async findAccount(ctx, id) {
    const known = ACCOUNTS[id] ?? { email: `${id}@example.com`, name: id, groups: [] };
    return {
      accountId: id,
      async claims() {
        return {
          sub: id,
          email: known.email,
          email_verified: true,
          name: known.name,
          groups: known.groups,
        };
      },
    };
  },
  // With `response_type=code` the ID token would carry only `sub` otherwise.
  conformIdTokenClaims: false,
  // `email` and `groups` come with `openid` alone too, whichever scopes the client asks for.
  claims: {
    openid: ['sub', 'email', 'email_verified', 'groups'],
    email: ['email', 'email_verified'],
    profile: ['name'],
    groups: ['groups'],
  },
  scopes: ['openid', 'offline_access', 'email', 'profile', 'groups'],
  // Throwaway keys: this provider lives for one test.
  cookies: { keys: ['portcullis-test-cookie-key'] },
  features: { devInteractions: { enabled: true } },
});
provider.proxy = false;

provider.on('server_error', (ctx, err) => console.error('server_error', err));
provider.on('grant.error', (ctx, err) => console.error('grant.error', err));

const server = provider.listen(port, '127.0.0.1', () => {
  console.log(`oidc-provider ready ${issuer}`);
});
for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => {
    server.close();
    process.exit(0);
  });
}
