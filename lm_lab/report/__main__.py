from lm_lab.report.cli import main

main()
