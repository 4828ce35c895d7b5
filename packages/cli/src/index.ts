export { main, defaultJobId } from './main.js';
export { openEndpoint, resolvePassword, type EndpointOptions } from './endpoints.js';
export { EXIT, exitCodeFor, syncJson, type CliIO } from './output.js';
