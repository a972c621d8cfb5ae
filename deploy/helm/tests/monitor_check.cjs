// Checks prometheus-operator objects the chart renders (ServiceMonitor, PodMonitor) two ways:
//  1. the JSON schema of @kubernetes-models/prometheus-operator (types, required fields, enums);
//  2. its TypeScript types, compiled with excess-property checks, so an unknown field (which
//     the schema lets through) fails too.
// Usage: node monitor_check.cjs NODE_MODULES_DIR FILE.json...  (one object per file)
// Prints one line per object; exits 1 if any fails.
"use strict";
const fs = require("fs");
const path = require("path");

const [nodeModulesArg, ...files] = process.argv.slice(2);
const nodeModules = nodeModulesArg && path.resolve(nodeModulesArg);
if (!nodeModules || files.length === 0) {
  console.error("usage: node monitor_check.cjs NODE_MODULES_DIR FILE.json...");
  process.exit(2);
}
const v1 = require(path.join(nodeModules, "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1"));
const ts = require(path.join(nodeModules, "typescript"));
const kinds = { ServiceMonitor: v1.ServiceMonitor, PodMonitor: v1.PodMonitor };

let failed = 0;
const typed = [];
for (const file of files) {
  const obj = JSON.parse(fs.readFileSync(file, "utf8"));
  const Model = kinds[obj.kind];
  if (!Model) {
    console.log(`FAIL ${path.basename(file)}: kind ${obj.kind} is not a prometheus-operator kind this check knows`);
    failed++;
    continue;
  }
  try {
    new Model(obj).validate();
    console.log(`ok   ${path.basename(file)}: ${obj.kind} ${obj.metadata.name} matches the prometheus-operator schema`);
  } catch (e) {
    console.log(`FAIL ${path.basename(file)}: ${obj.kind} ${obj.metadata.name}: ${e.message}`);
    failed++;
  }
  typed.push({ file, obj });
}

// One TypeScript source assigning every object to its interface; it sits beside node_modules
// (in memory) so the package's types resolve from there.
const source = path.join(path.dirname(nodeModules), "__ragent_monitor_check__.ts");
const lines = [];
for (const kind of Object.keys(kinds)) {
  lines.push(`import type { I${kind} } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/${kind}";`);
}
typed.forEach(({ obj }, i) => {
  lines.push(`export const object${i}: I${obj.kind} = ${JSON.stringify(obj)};`);
});
const text = lines.join("\n") + "\n";
const options = {
  noEmit: true,
  strict: true,
  skipLibCheck: true,
  module: ts.ModuleKind.CommonJS,
  moduleResolution: ts.ModuleResolutionKind.Node10,
  target: ts.ScriptTarget.ES2020,
  types: [],
};
const host = ts.createCompilerHost(options);
const getSourceFile = host.getSourceFile.bind(host);
host.getSourceFile = (name, lang, ...rest) =>
  name === source ? ts.createSourceFile(name, text, lang) : getSourceFile(name, lang, ...rest);
const fileExists = host.fileExists.bind(host);
host.fileExists = (name) => name === source || fileExists(name);
const readFile = host.readFile.bind(host);
host.readFile = (name) => (name === source ? text : readFile(name));
const program = ts.createProgram([source], options, host);
const diagnostics = ts.getPreEmitDiagnostics(program);
for (const d of diagnostics) {
  const msg = ts.flattenDiagnosticMessageText(d.messageText, "\n");
  let where = "";
  if (d.file && d.start !== undefined && d.file.fileName === source) {
    const { line } = d.file.getLineAndCharacterOfPosition(d.start);
    const entry = typed[line - Object.keys(kinds).length];
    where = entry ? `${path.basename(entry.file)}: ` : "";
  }
  console.log(`FAIL ${where}TypeScript: ${msg.split("\n")[0].slice(0, 240)}`);
  failed++;
}
if (diagnostics.length === 0) {
  console.log(`ok   ${typed.length} object(s) match the prometheus-operator TypeScript types (no unknown fields)`);
}
process.exit(failed ? 1 : 0);
