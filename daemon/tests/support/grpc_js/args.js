'use strict';
/**
 * The command line of `client.js` and `server.js`, as `../grpc_py`'s argparse reads it: Node's
 * own `util.parseArgs` (`--flag value` or `--flag=value`), plus what argparse adds on top:
 * numbers, choices, required flags, `_` in place of `-` in the names, and exit 2 with the usage
 * on a bad command line.
 */

const util = require('util');

/**
 * Parses `argv` by `spec` (flag name → 'string' | 'number' | 'int' | 'flag' | [choices]);
 * `required` names flags that must be given.
 */
function parse(argv, spec, usage, required = []) {
  const fail = (msg) => {
    process.stderr.write(`${usage}\nerror: ${msg}\n`);
    process.exit(2);
  };
  const options = {};
  for (const [name, kind] of Object.entries(spec)) {
    options[name] = { type: kind === 'flag' ? 'boolean' : 'string' };
  }
  let values;
  try {
    ({ values } = util.parseArgs({ args: argv, options, strict: true, allowPositionals: false }));
  } catch (e) {
    fail(e.message);
  }
  const out = {};
  for (const [name, value] of Object.entries(values)) {
    const kind = spec[name];
    let v = value;
    if (kind === 'number' || kind === 'int') {
      v = Number(value);
      if (value === '' || !Number.isFinite(v) || (kind === 'int' && !Number.isInteger(v))) {
        fail(`argument --${name}: invalid ${kind}: ${value}`);
      }
    } else if (Array.isArray(kind) && !kind.includes(value)) {
      fail(`argument --${name}: invalid choice: ${value}`);
    }
    out[name.replace(/-/g, '_')] = v;
  }
  for (const name of required) {
    if (out[name.replace(/-/g, '_')] === undefined) fail(`--${name} is required`);
  }
  return out;
}

module.exports = { parse };
